"""`sidetune serve` as a user runs it, started in the background by a script, supervising its children: each kind of
child (Redis, the extract worker, the train worker, the inference service, the API) is SIGKILLed at three points of
a job (queued, extracting, training). Every job must succeed, `serve` must stay up, the killed process must be
replaced (with a log line) and leave nothing behind, and the process count must return to normal. While Redis is
down the API answers 503 within about a second. Then SIGTERM stops everything, leaving no process behind.

The figures (kills x points, jobs lost, stack exits) are printed at the end (`pytest -s` shows them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from services.data.digits import write_digits
from storage.redis import JobStore
from worker.launcher import free_port

KINDS = ("redis", "extract-worker", "train-worker", "inference", "api")
POINTS = ("queued", "extracting", "training")
RESULTS: dict[tuple[str, str], str] = {}


def _kind(proc: psutil.Process) -> str | None:
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return None
    if cmd and "redis-server" in cmd[0]:
        return "redis"
    if "worker.cli" in cmd:
        if "--queues" in cmd:
            return f"{cmd[cmd.index('--queues') + 1]}-worker"
        return cmd[-1]  # api, inference
    return None


class Serve:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ports = {
            "SIDETUNE_EMBEDDED_REDIS_PORT": free_port(),
            "SIDETUNE_API_PORT": free_port(),
            "SIDETUNE_INFERENCE_PORT": free_port(),
        }
        self.api = f"http://127.0.0.1:{self.ports['SIDETUNE_API_PORT']}"
        self.redis_url = f"redis://127.0.0.1:{self.ports['SIDETUNE_EMBEDDED_REDIS_PORT']}/0"
        env = {
            **os.environ,
            **{k: str(v) for k, v in self.ports.items()},
            "SIDETUNE_DATA_DIR": str(root),
            "SIDETUNE_DEVICE": "cpu",
            "SIDETUNE_HEARTBEAT_TTL_S": "3",
            "SIDETUNE_LOG_FORMAT": "text",
        }
        env.pop("SIDETUNE_REDIS_URL", None)
        # `&` in a non-interactive shell: the background job starts with SIGINT and SIGQUIT ignored, as a script's
        # `sidetune serve &` would. The shell exits at once; serve lives on.
        launch = f'"{sys.executable}" -m worker.cli serve >"{root}/serve.log" 2>&1 & echo $!'
        pid = subprocess.run(["bash", "-c", launch], env=env, capture_output=True, text=True, check=True).stdout
        self.proc = psutil.Process(int(pid))

    def children(self) -> dict[str, list[psutil.Process]]:
        out: dict[str, list[psutil.Process]] = {}
        for child in self.proc.children():
            if child.status() != psutil.STATUS_ZOMBIE and (kind := _kind(child)):
                out.setdefault(kind, []).append(child)
        return out

    def log(self) -> str:
        return (self.root / "serve.log").read_text()


def _wait(predicate, timeout_s: float, what: str, every_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
        except (httpx.HTTPError, psutil.Error):
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def _normal(serve: Serve) -> bool:
    """One live process of each kind, and no descendant but multiprocessing's forkserver and resource tracker."""
    children = serve.children()
    if sorted(children) != sorted(KINDS) or any(len(p) != 1 for p in children.values()):
        return False
    for procs in children.values():
        for d in procs[0].children(recursive=True):
            cmd = " ".join(d.cmdline())
            if "forkserver" not in cmd and "resource_tracker" not in cmd and "redis" not in cmd:
                return False
    return httpx.get(f"{serve.api}/readyz", timeout=2).status_code == 200


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serve")
    write_digits(root / "datasets" / "digits", limit=60)
    running = Serve(root)
    try:
        _wait(lambda: "sidetune is ready" in running.log(), 180, "serve to start", every_s=0.25)
        yield running
    finally:
        if running.proc.is_running():
            for child in running.proc.children(recursive=True):
                child.kill()
            running.proc.kill()


def test_serve_catches_the_stop_signals_even_when_started_in_the_background(serve: Serve) -> None:
    status = Path(f"/proc/{serve.proc.pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        assert caught & (1 << (sig - 1)), f"{sig.name} is not handled by serve"
    assert _wait(lambda: _normal(serve), 60, "the stack to be ready")


def _spec(serve: Serve, kind: str, point: str) -> dict:
    # A backbone seed of its own per case: a cache entry nobody has extracted yet, so every job extracts.
    seed = KINDS.index(kind) * len(POINTS) + POINTS.index(point) + 1
    spec = {
        "dataset": {"path": str(serve.root / "datasets" / "digits" / "train")},
        "backbone": {"name": "test_vit", "pretrained": False, "image_size": 64, "init_seed": seed},
        "method": {"name": "losa", "rank": 2, "layers": 2},
        "extraction": {"batch_size": 2},
        "training": {"epochs": 1, "batch_size": 16},
    }
    if point == "training":  # online: the backbone runs on every step, so training lasts long enough to be hit
        spec.update(execution={"mode": "online"}, training={"epochs": 3, "batch_size": 8, "lr": 0.05})
    return spec


def _reached(store: JobStore, job_id: str, point: str) -> bool:
    job = store.get_job(job_id)
    if point == "queued":
        return True
    progress = job.get("progress") or {}
    return job["status"] == point and (point == "extracting" or progress.get("done", 0) >= 1)


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_child_killed_during_a_job_is_restarted_and_the_job_succeeds(serve: Serve, kind: str, point: str) -> None:
    store = JobStore.from_url(serve.redis_url)
    assert _wait(lambda: _normal(serve), 60, "the stack to be back to normal")
    job_id = httpx.post(f"{serve.api}/jobs", json=_spec(serve, kind, point), timeout=30).json()["id"]
    _wait(lambda: _reached(store, job_id, point), 120, f"the job to reach {point}")
    status_at_kill = store.get_job(job_id)["status"]
    victim = serve.children()[kind][0]
    family = [victim, *victim.children(recursive=True)]
    victim.kill()
    if kind == "redis":  # the API fails fast (no 30 s of retries): 503 at once, or 200 if Redis is back already
        t0 = time.monotonic()
        r = httpx.get(f"{serve.api}/jobs/{job_id}", timeout=10)
        assert r.status_code in (200, 503) and time.monotonic() - t0 < 1.5, (r.status_code, time.monotonic() - t0)
        if r.status_code == 503:
            assert r.headers["retry-after"] and r.json()["error"]["code"] == "store_unavailable"
    _wait(
        lambda: store.get_job(job_id)["status"] in ("succeeded", "failed", "cancelled"),
        180,
        "the job to end",
        every_s=0.2,
    )
    job = store.get_job(job_id)
    RESULTS[(kind, point)] = job["status"]
    assert job["status"] == "succeeded", (kind, point, status_at_kill, job["error"])
    assert serve.proc.is_running(), serve.log()[-3000:]
    _wait(lambda: _normal(serve), 90, "the process count to return to normal", every_s=0.2)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family), "left behind"
    assert f"{kind} exited with signal SIGKILL" in serve.log() and f"{kind} restarted" in serve.log()
    if kind == "inference":  # predict through the API reaches the new inference service
        image = next((serve.root / "datasets" / "digits" / "holdout").rglob("*.png")).read_bytes()
        files = [("files", ("x.png", image, "image/png"))]
        r = _wait(
            lambda: (
                (
                    r := httpx.post(f"{serve.api}/v1/models/{job['model_id']}:predict-files", files=files, timeout=30)
                ).status_code
                == 200
                and r
            ),
            60,
            "predict",
        )
        assert r.json()["predictions"][0]["label"] in job_classes(store, job)


def job_classes(store: JobStore, job: dict) -> list[str]:
    return store.get_model(job["model_id"])["classes"]


def test_sigterm_stops_everything_and_leaves_no_process(serve: Serve) -> None:
    family = serve.proc.children(recursive=True)
    assert len(family) >= len(KINDS)
    serve.proc.send_signal(signal.SIGTERM)
    serve.proc.wait(60)
    _wait(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family), 30, "no orphans")
    lost = sum(status != "succeeded" for status in RESULTS.values())
    print(
        f"\nsupervision: {len(RESULTS)} kills ({len(KINDS)} kinds x {len(POINTS)} points), {lost} jobs lost, "
        f"0 stack exits"
    )
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{serve.api}/healthz", timeout=2)


def test_logs_go_to_another_directory_or_to_stderr(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """SIDETUNE_LOG_DIR: each child's log in that directory (off the data disk), or `stderr`: the children write to
    the supervisor's own stderr (a container's log)."""
    from storage.settings import Settings
    from worker.launcher import Stack

    missing = str(tmp_path / "missing.json")
    elsewhere = Stack(Settings(data_dir=tmp_path / "data", log_dir=str(tmp_path / "logs")))
    assert elsewhere.log_dir == tmp_path / "logs"
    assert elsewhere.spawn("plan", "plan", missing).wait(60) == 2
    assert missing in (tmp_path / "logs" / "plan.log").read_text() and not (tmp_path / "data" / "logs").exists()
    inherited = Stack(Settings(data_dir=tmp_path / "data", log_dir="stderr"))
    assert inherited.log_dir is None and inherited.logs_where == "this process's stderr"
    capfd.readouterr()
    assert inherited.spawn("plan", "plan", missing).wait(60) == 2
    assert missing in capfd.readouterr().err
