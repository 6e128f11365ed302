"""Several machines sharing nothing but Redis and the store: each "machine" is one process with a data dir of its own
(worker.launcher.Stack, one process each). A dataset is uploaded through the API of machine A, extracted on B,
trained on C, and served by the inference service on D (directly, and through A, which forwards predict to D). C is
SIGKILLed mid-training; a train worker started on E resumes from C's last checkpoint on the store and finishes.
Run on a real S3-compatible server (moto) and on a shared `file://` directory.
"""

from __future__ import annotations

import base64
import io
import signal
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.data.digits import write_digits
from storage.redis import JobStore
from storage.redis_server import RedisServer
from storage.settings import Settings
from storage.store import Store
from worker.client import Client
from worker.launcher import Stack, free_port

EPOCHS = 40  # long enough that the kill, after 2 epochs are reported (every 0.5 s at most), lands mid-training


class Machines:
    """One Stack per machine, each with its own data dir and ports, all on one Redis and one store."""

    def __init__(self, root: Path, redis_url: str, store_url: str) -> None:
        self.root, self.redis_url, self.store_url = root, redis_url, store_url
        self.inference_port = free_port()
        self.stacks: dict[str, Stack] = {}

    def settings(self, name: str) -> Settings:
        return Settings(
            data_dir=self.root / name,
            redis_url=self.redis_url,
            store_url=self.store_url,
            device="cpu",
            api_port=free_port(),
            inference_port=self.inference_port,
            heartbeat_ttl_s=2.0,
            inference_url=f"http://127.0.0.1:{self.inference_port}",
        )

    def start(self, name: str, *args: str) -> Stack:
        stack = self.stacks[name] = Stack(self.settings(name))
        stack.spawn(args[0] if args[0] != "worker" else f"{args[-1]}-worker", *args)
        return stack

    def pid(self, name: str) -> int:
        return next(iter(self.stacks[name].procs.values())).pid

    def log(self, name: str) -> str:
        return "".join(p.read_text() for p in self.stacks[name].log_dir.glob("*.log"))

    def stop(self) -> None:
        for stack in self.stacks.values():  # every machine shuts down at once, then each is waited for
            for name, proc in stack.procs.items():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGQUIT if "worker" in name else signal.SIGTERM)
        for stack in self.stacks.values():
            stack.stop()


@pytest.fixture(params=["s3", "file"])
def machines(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Machines]:
    store_url = request.getfixturevalue("s3_url") if request.param == "s3" else f"file://{tmp_path}/shared"
    redis = RedisServer(tmp_path / "redis", free_port()).start()
    group = Machines(tmp_path, redis.url, store_url)
    try:
        yield group
    finally:
        group.stop()
        redis.stop()


def _zip(root: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(root.rglob("*.png")):
            zf.write(p, p.relative_to(root.parent))
    return buf.getvalue()


def _wait_for(predicate, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_machines_sharing_only_redis_and_the_store(machines: Machines, tmp_path: Path) -> None:
    a = machines.start("A", "api")
    machines.start("B", "worker", "--queues", "extract")
    machines.start("C", "worker", "--queues", "train")
    d = machines.start("D", "inference")
    a.wait_ready(120, [f"{a.api_url}/readyz"])  # Redis, and live extract and train workers (B, C)
    d.wait_ready(120, [f"{d.inference_url}/v2/health/ready"])
    api, store = Client(a.api_url), JobStore.from_url(machines.redis_url)

    write_digits(tmp_path / "upload", limit=60)
    r = httpx.post(
        f"{a.api_url}/datasets", files={"file": ("digits.zip", _zip(tmp_path / "upload" / "train"))}, timeout=60
    )
    assert r.status_code == 201, r.text
    dataset = r.json()["id"]
    body = {
        "dataset": {"id": dataset},
        "backbone": {"name": "test_vit", "pretrained": False, "image_size": 64},
        "method": {"name": "losa", "rank": 4, "layers": 2},
        "training": {"epochs": EPOCHS, "batch_size": 4, "lr": 1e-3},
    }
    job_id = api.submit(body)["id"]

    def training_on_c_after(epochs: int) -> bool:
        job = store.get_job(job_id)
        assert job["status"] not in ("succeeded", "failed"), job.get("error")
        running = store.running_steps().get(job_id, {})
        on_c = any(w.endswith(f"-{machines.pid('C')}") for w in running)
        progress = job.get("progress") or {}
        return on_c and progress.get("stage") == "training" and progress.get("done", 0) >= epochs

    _wait_for(lambda: training_on_c_after(2))
    c = machines.stacks["C"].procs["train-worker"]
    c.send_signal(signal.SIGKILL)
    c.wait()
    machines.start("E", "worker", "--queues", "train")
    job = api.wait(job_id, timeout_s=180)
    assert job["status"] == "succeeded", job["error"]

    events = api.events(job_id)
    while more := api.events(job_id, after=events[-1]["seq"]):
        events += more
    messages = [e["message"] for e in events]
    assert any("stopped (no heartbeat) during training" in m for m in messages), messages
    resumed = [m for m in messages if m.startswith("resumed training from the checkpoint of epoch")]
    # killed once 2 epochs were reported: the last checkpoint on the store is epoch 1's or later (on a quiet machine
    # training can run ahead of the reports, up to the last epoch whose step was killed before it was marked done)
    assert resumed and 1 <= int(resumed[0].rsplit(" ", 1)[1]) <= EPOCHS, messages
    assert "step extract started" in machines.log("B") and job_id in machines.log("B")
    assert "step train started" in machines.log("E") and job_id in machines.log("E")
    # the upload went to the store; B read it (a copy of its own from S3; in place on the shared directory) and wrote
    # the cache to the store; C and E trained from the cache on the store
    fetched = (machines.root / "B" / "datasets" / dataset / "_complete.json").is_file()
    assert fetched == machines.store_url.startswith("s3://")
    for name in ("C", "D", "E"):
        assert not (machines.root / name / "datasets").exists() and not (machines.root / name / "cache").exists()
    model_id = job["model_id"]
    assert Store(machines.store_url).folder("artifacts", "models", model_id).check()["files"]["weights.safetensors"]
    # the last checkpoint stays on the store for the retention, listed through A
    assert Store(machines.store_url).folder("artifacts", "checkpoints", job_id).files()
    assert {c["name"]: c["epoch"] for c in api.checkpoints(job_id)["data"]}["checkpoint.json"] == EPOCHS

    holdout = sorted((tmp_path / "upload" / "holdout").glob("*/*.png"))[:3]
    via_a = api.predict(model_id, holdout)  # forwarded by A to D
    via_d = Client(d.inference_url).predict(model_id, holdout)
    assert via_a == via_d and len(via_a) == 3
    v2 = httpx.post(
        f"{a.api_url}/v2/models/{model_id}/infer",
        timeout=60,
        json={
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [len(holdout)],
                    "data": [base64.b64encode(p.read_bytes()).decode() for p in holdout],
                }
            ]
        },
    )
    assert v2.status_code == 200 and v2.json()["outputs"][0]["data"] == [p["label"] for p in via_a]
