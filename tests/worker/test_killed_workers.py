"""Faults with real processes: a worker SIGKILLed mid-step. The watchdog (in every worker) sees its heartbeat
expire and requeues the step; a new worker resumes it from what was finished (cache batches, training
checkpoints), and the job succeeds. A stack of its own, so killing workers disturbs no other test."""

from __future__ import annotations

import signal
import time

import httpx
import numpy as np
import psutil
import pytest

from services.data.digits import write_digits
from storage.cache import FeatureCache
from storage.redis import JobStore
from storage.settings import Settings
from worker.client import Client
from worker.launcher import Stack, free_port


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("faults")
    # a dead worker is noticed after heartbeat_ttl_s: 5 s rather than 15 (each test kills one)
    settings = Settings(
        data_dir=data,
        embedded_redis_port=free_port(),
        api_port=free_port(),
        inference_port=free_port(),
        device="cpu",
        heartbeat_ttl_s=5.0,
    )
    write_digits(data / "datasets" / "digits", limit=120)
    # the extraction tests' dataset: long enough (270 batches of 2 at 224 px) that a kill after the first progress
    # reports (every 0.5 s at most) lands mid-extraction even when the loaders and writers keep up with the forward
    write_digits(data / "datasets" / "digits600", limit=600)
    with Stack(settings) as running:
        yield running, Client(running.api_url), JobStore.from_url(running.redis.url)


def _wait_for(predicate, timeout_s: float = 120.0, every_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every_s)


def _kill_and_replace(running: Stack, name: str, queue: str) -> None:
    """SIGKILL a worker; the stack's supervisor starts a new one."""
    old = running.procs[name]
    old.send_signal(signal.SIGKILL)
    old.wait()
    _wait_for(lambda: running.procs[name] is not old, timeout_s=30)


def _kill_midway(fault_stack, body: dict, worker: str, queue: str, after: int) -> tuple[dict, list[str]]:
    """Submit `body`, SIGKILL `worker` once `after` progress steps are done, start a new one; the ended job and
    its event messages."""
    running, client, store = fault_stack
    job_id = client.submit(body)["id"]
    _wait_for(lambda: (store.get_job(job_id).get("progress") or {}).get("done", 0) >= after)
    _kill_and_replace(running, worker, queue)
    job = client.wait(job_id, timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    return job, [e["message"] for e in client.events(job_id)]


def _spec(running: Stack, method: dict, data: str = "digits", **extra) -> dict:
    dataset = {"path": str(running.settings.data_path / "datasets" / data / "train")}
    backbone = {"name": "test_vit", "pretrained": False, "image_size": 224}
    return {"dataset": dataset, "backbone": backbone, "method": method, **extra}


def test_sigkilled_extract_worker_resumes_and_the_cache_equals_a_clean_run(fault_stack) -> None:
    running = fault_stack[0]
    body = _spec(
        running,
        {"name": "losa", "rank": 4, "layers": 2},
        "digits600",
        extraction={"batch_size": 2, "shards": 1},
        training={"epochs": 1},
    )
    job, messages = _kill_midway(fault_stack, body, "extract-worker", "extract", after=3)
    assert any("stopped (no heartbeat) during extraction" in m for m in messages), messages
    assert any("resuming extraction" in m for m in messages), messages
    n_batches = -(-job["metrics"]["images"] // 2)
    assert 0 < job["metrics"]["backbone_forwards"] < n_batches  # the resumed run forwarded only what was missing

    clean = Settings(data_dir=running.settings.data_path / "clean", allowed_roots=running.settings.roots)
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter
    from services.spec import JobSpec

    result = run_extraction(JobSpec.model_validate(body), clean, NullReporter())
    resumed = FeatureCache(running.settings.cache_dir).entry(job["cache_key"])
    np.testing.assert_array_equal(resumed.read(), FeatureCache(clean.cache_dir).entry(result["cache_key"]).read())


def test_sigkilled_extract_worker_with_loader_processes_leaves_none_and_resumes_bit_identical(
    fault_stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loader processes and parallel shard writers (as on a GPU box): the extract worker is SIGKILLed mid-extraction;
    its forkserver and loader processes end with it, and a new one resumes the cache, equal to a clean run."""
    running, client, store = fault_stack
    monkeypatch.setenv("SIDETUNE_LOADER_WORKERS", "2")
    monkeypatch.setenv("SIDETUNE_CACHE_WRITERS", "3")
    _kill_and_replace(running, "extract-worker", "extract")  # both this worker and its replacement use them
    body = _spec(
        running,
        {"name": "losa", "rank": 4, "layers": 3},
        "digits600",
        extraction={"batch_size": 2, "shards": 1},
        training={"epochs": 1},
    )
    job_id = client.submit(body)["id"]
    _wait_for(lambda: (store.get_job(job_id).get("progress") or {}).get("done", 0) >= 3)
    family = psutil.Process(running.procs["extract-worker"].pid).children(recursive=True)
    assert len(family) >= 4, family  # forkserver, resource tracker, 2 loader processes
    _kill_and_replace(running, "extract-worker", "extract")
    _wait_for(lambda: all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in family), timeout_s=20)
    job = client.wait(job_id, timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    messages = [e["message"] for e in client.events(job_id)]
    assert any("resuming extraction" in m for m in messages), messages

    clean = Settings(
        data_dir=running.settings.data_path / "clean-loaders",
        allowed_roots=running.settings.roots,
        loader_workers=0,
        cache_writers=1,
    )
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter
    from services.spec import JobSpec

    result = run_extraction(JobSpec.model_validate(body), clean, NullReporter())
    resumed = FeatureCache(running.settings.cache_dir).entry(job["cache_key"])
    np.testing.assert_array_equal(resumed.read(), FeatureCache(clean.cache_dir).entry(result["cache_key"]).read())
    monkeypatch.undo()
    _kill_and_replace(running, "extract-worker", "extract")  # the module's other tests get a plain worker again


def test_sigkilled_train_worker_resumes_from_the_last_checkpoint(fault_stack) -> None:
    running, client, _ = fault_stack
    body = _spec(
        running,
        {"name": "losa", "rank": 4, "layers": 2},
        execution={"mode": "online"},
        training={"epochs": 8, "batch_size": 16},
    )
    job, messages = _kill_midway(fault_stack, body, "train-worker", "train", after=2)
    assert any("stopped (no heartbeat) during training" in m for m in messages), messages
    resumed = [m for m in messages if m.startswith("resumed training from the checkpoint of epoch")]
    assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= 2, messages
    assert sum(e["type"] == "metrics" for e in client.events(job["id"])) >= 8


def test_redis_restart_mid_job_loses_nothing(fault_stack) -> None:
    """Redis (AOF on) restarts while a job trains: the workers and the API reconnect, the job finishes, and every
    record written before the restart (jobs, events, models) is still there."""
    running, client, store = fault_stack
    done = client.wait(client.submit(_spec(running, {"name": "linear"}, training={"epochs": 1}))["id"])
    assert done["status"] == "succeeded", done["error"]
    body = _spec(
        running,
        {"name": "losa", "rank": 4, "layers": 2},
        execution={"mode": "online"},
        training={"epochs": 6, "batch_size": 16},
    )
    job_id = client.submit(body)["id"]
    _wait_for(
        lambda: (
            store.get_job(job_id)["status"] == "training"
            and (store.get_job(job_id).get("progress") or {}).get("done", 0) >= 1
        )
    )
    events_before = client.events(done["id"])
    running.redis.stop()
    ready = httpx.get(f"{running.api_url}/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["redis"] is False
    time.sleep(3.0)  # steps writing to Redis meanwhile wait (the job store retries) instead of failing
    running.redis.start()

    job = client.wait(job_id, timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    assert sum(e["type"] == "metrics" and "epoch" in e["data"] for e in client.events(job_id)) == 6  # one per epoch
    assert client.job(done["id"])["status"] == "succeeded"
    assert client.events(done["id"]) == events_before
    paths = sorted((running.settings.data_path / "datasets" / "digits" / "holdout").glob("*/*.png"))[:2]
    assert len(client.predict(done["model_id"], paths)) == 2  # the model registered before the restart serves


def test_api_restart_loses_nothing(fault_stack) -> None:
    """The API process is SIGKILLed while a job runs and the supervisor starts it again: the job goes on and is
    visible."""
    running, client, store = fault_stack
    body = _spec(
        running,
        {"name": "losa", "rank": 4, "layers": 2},
        execution={"mode": "online"},
        training={"epochs": 4, "batch_size": 16},
    )
    job_id = client.submit(body)["id"]
    api = running.procs["api"]
    api.send_signal(signal.SIGKILL)
    api.wait()
    _wait_for(lambda: running.procs["api"] is not api, timeout_s=30)  # restarted by the supervisor
    running.wait_ready(60)
    job = client.wait(job_id, timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    assert any(j["id"] == job_id for j in client.jobs(limit=100))
