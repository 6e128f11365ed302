"""A full disk with real processes: the data dir (store and feature cache) on an 8 MB tmpfs, filled to the last byte
while a job extracts and while one trains. Each job fails `disk_full` naming the directory (it was `internal_error`),
the extraction removes its partial cache entry, nothing else breaks (the same worker processes, the API ready), the
logs (SIDETUNE_LOG_DIR, on another disk) keep the failure, and once the space is freed a resubmission succeeds.
Redis and the logs live on another disk, as an operator following the README would put them."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from services.data.digits import write_digits
from storage.cache import FeatureCache
from storage.redis import JobStore
from storage.redis_server import RedisServer
from storage.settings import Settings
from tests.disk import fill, mount_tmpfs, unmount
from worker.client import Client
from worker.launcher import Stack, free_port


@pytest.fixture(scope="module")
def disk_stack(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("diskfull")
    data = mount_tmpfs(root / "data", 8)
    redis = RedisServer(root / "redis", free_port()).start()
    settings = Settings(
        data_dir=data, redis_url=redis.url, api_port=free_port(), device="cpu", log_dir=str(root / "logs")
    )
    write_digits(data / "datasets" / "digits", limit=200)  # 179 images: 1.7 MB of cache at 96 px
    stack = Stack(settings)
    try:
        for queue in ("extract", "train"):
            stack.spawn(f"{queue}-worker", "worker", "--queues", queue)
        stack.spawn("api", "api")
        stack.wait_ready(180, [f"{stack.api_url}/readyz"])
        yield stack, Client(stack.api_url), JobStore.from_url(redis.url), data
    finally:
        stack.stop()
        redis.stop()
        unmount(data)


def _wait_for(predicate, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _spec(data: Path, image_size: int, **extra) -> dict:
    return {
        "dataset": {"path": str(data / "datasets" / "digits" / "train")},
        "method": {"name": "losa", "rank": 4, "layers": 2},
        "backbone": {"name": "test_vit", "pretrained": False, "image_size": image_size},
        **extra,
    }


def _fill_once(store: JobStore, job_id: str, status: str, data: Path, after: int = 0) -> Path:
    """Fill the disk once the job is in `status` and has reported `after` progress steps there."""

    def going() -> bool:
        job = store.get_job(job_id)
        return job["status"] == status and (job.get("progress") or {}).get("done", 0) >= after

    _wait_for(going)
    return fill(data)


def _healthy(stack: Stack, pids: dict[str, int]) -> None:
    assert {name: p.pid for name, p in stack.procs.items()} == pids
    assert all(p.poll() is None for p in stack.procs.values())
    assert httpx.get(f"{stack.api_url}/readyz", timeout=10).status_code == 200


def test_a_disk_filled_mid_extraction_fails_disk_full_and_a_resubmission_succeeds(disk_stack) -> None:
    stack, client, store, data = disk_stack
    pids = {name: p.pid for name, p in stack.procs.items()}
    body = _spec(data, 96, extraction={"batch_size": 4, "shards": 1}, training={"epochs": 1})
    job_id = client.submit(body)["id"]
    ballast = _fill_once(store, job_id, "extracting", data, after=3)
    job = client.wait(job_id, timeout_s=120)
    assert job["status"] == "failed" and job["error"]["code"] == "disk_full", job["error"]
    assert f"no space left under {data / 'cache'}" in job["error"]["message"]
    assert "more needed" in job["error"]["message"], job["error"]
    messages = [e["message"] for e in client.events(job_id)]
    assert any(m.startswith("removed the partial cache entry") for m in messages), messages
    assert FeatureCache(data / "cache").entries() == []  # its space came back
    _healthy(stack, pids)
    assert "disk_full" in (stack.log_dir / "extract-worker.log").read_text()  # logs on another disk: kept

    ballast.unlink()
    again = client.wait(client.submit(body)["id"], timeout_s=300)
    assert again["status"] == "succeeded", again["error"]


def test_a_disk_filled_mid_training_fails_disk_full_and_a_resubmission_succeeds(disk_stack) -> None:
    stack, client, store, data = disk_stack
    pids = {name: p.pid for name, p in stack.procs.items()}
    body = _spec(data, 64, training={"epochs": 20, "batch_size": 16, "lr": 0.05})
    job_id = client.submit(body)["id"]
    ballast = _fill_once(store, job_id, "training", data)  # its cache is written; a checkpoint follows every epoch
    job = client.wait(job_id, timeout_s=120)
    assert job["status"] == "failed" and job["error"]["code"] == "disk_full", job["error"]
    assert f"no space left under {data / 'artifacts'}" in job["error"]["message"], job["error"]
    _healthy(stack, pids)

    ballast.unlink()
    again = client.wait(client.submit(body)["id"], timeout_s=300)
    assert again["status"] == "succeeded", again["error"]
