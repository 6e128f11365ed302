"""The worker's lifecycle, with a real Redis and real job steps run through the Celery tasks (eagerly, in this
process's main thread, where a worker's solo pool runs them): shard tasks capped by the batches, the soft time limit
(a step stopped after `job_timeout_s`: `job_timeout`), the hard one (the job fails and the worker ends), transient
store errors retried with backoff before the job fails, and the heartbeat logging its failures as warnings."""

from __future__ import annotations

import gc
import logging
import threading
import time
from pathlib import Path

import pytest

from services.data.datasets import read_imagefolder
from services.jobs.pipeline import extract_step
from storage.redis import JobStore
from storage.settings import Settings
from worker import tasks
from worker.heartbeat import Heartbeat, enforce_hard_limit
from worker.launcher import free_port


def _spec(digits: Path, **over) -> dict:
    spec = {
        "dataset": {"path": str(digits)},
        "backbone": {"name": "test_vit", "pretrained": False, "image_size": 32},
        "method": {"name": "losa", "rank": 2, "layers": 2},
        "extraction": {"batch_size": 64},
        "training": {"epochs": 1},
    }
    return {**spec, **over}


def test_shard_tasks_are_capped_by_the_batches(settings: Settings, digits_root: Path) -> None:
    store = JobStore.from_url(settings.broker_url)
    job = store.create_job(_spec(digits_root / "train", extraction={"batch_size": 64, "shards": 1024}))
    step = extract_step(store, settings, job["id"])
    images = len(read_imagefolder(digits_root / "train"))
    assert step == ("shards", -(-images // 64)), (step, store.get_job(job["id"])["error"])


@pytest.fixture
def eager(settings: Settings, monkeypatch: pytest.MonkeyPatch):
    """The tasks' settings from the environment, as a worker reads them."""

    def use(**env: object) -> JobStore:
        for k, v in {
            "SIDETUNE_DATA_DIR": settings.data_dir,
            "SIDETUNE_REDIS_URL": settings.broker_url,
            "SIDETUNE_ALLOWED_ROOTS": ",".join(map(str, settings.allowed_roots)),
            **env,
        }.items():
            monkeypatch.setenv(k, str(v))
        tasks._context.cache_clear()
        return tasks._context()[0]

    yield use
    tasks._context.cache_clear()
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps instances: one bound to a dead endpoint must not stay


def test_a_step_longer_than_job_timeout_is_stopped_and_the_job_fails(eager, digits_root: Path) -> None:
    store = eager(SIDETUNE_JOB_TIMEOUT_S=2)
    body = _spec(digits_root / "train", execution={"mode": "online"}, training={"epochs": 200})
    job = store.create_job(body)
    store.set_fields(job["id"], extracted=True)
    t0 = time.monotonic()
    tasks.train.apply(args=[job["id"]])
    record = store.get_job(job["id"])
    assert record["status"] == "failed" and record["error"]["code"] == "job_timeout", record["error"]
    assert "job_timeout_s" in record["error"]["message"] and time.monotonic() - t0 < 30
    assert tasks.current is None and not store.running_steps().get(job["id"])


def test_a_step_that_does_not_stop_fails_its_job_and_ends_the_worker(eager, digits_root: Path) -> None:
    store = eager(SIDETUNE_JOB_TIMEOUT_S=5)
    settings = tasks._context()[1]
    job = store.create_job(_spec(digits_root / "train"))
    ended = threading.Event()
    tasks.current = (job["id"], "train", time.monotonic() - 5 - tasks.HARD_LIMIT_GRACE_S - 1)
    try:
        assert enforce_hard_limit(store, settings, end=ended.set)
    finally:
        tasks.current = None
    assert ended.is_set()
    assert store.get_job(job["id"])["error"]["code"] == "job_timeout"
    assert not enforce_hard_limit(store, settings, end=ended.set)  # nothing running: nothing to do


def test_a_step_leaves_no_cyclic_garbage_behind(eager, digits_root: Path) -> None:
    """The train step draws its plots with matplotlib, whose figures are reference cycles: with automatic collection
    off (with torch loaded a worker's full collections are rare), they outlived the step and piled up over a soak."""
    from matplotlib.figure import Figure

    store = eager()
    job = store.create_job(_spec(digits_root / "train", execution={"mode": "online"}))
    store.set_fields(job["id"], extracted=True)
    gc.collect()
    gc.disable()
    try:
        tasks.train.apply(args=[job["id"]])
        figures = sum(isinstance(o, Figure) for o in gc.get_objects())
    finally:
        gc.enable()
    assert store.get_job(job["id"])["status"] == "succeeded", store.get_job(job["id"])["error"]
    assert figures == 0


def test_transient_store_errors_are_retried_then_the_job_fails(eager, digits_root: Path) -> None:
    # The store on S3 behind a port nothing listens on: every call is StoreUnavailable.
    store = eager(
        SIDETUNE_STORE_URL="s3://nowhere/x",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
        AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="x",
        AWS_MAX_ATTEMPTS="1",
        AWS_DEFAULT_REGION="us-east-1",
    )
    job = store.create_job(_spec(digits_root / "train", execution={"mode": "online"}))
    store.set_fields(job["id"], extracted=True)
    tasks.train.apply(args=[job["id"]])  # eagerly: each retry runs at once (a worker waits 5, 10, 20, 40 s)
    record = store.get_job(job["id"])
    assert record["status"] == "failed" and record["error"]["code"] == "storage_unavailable", record["error"]
    retries = [e["message"] for e in store.events(job["id"]) if "retrying in" in e["message"]]
    assert len(retries) == tasks.RETRIES and retries[0].endswith("retrying in 5 s (1/4)"), retries


def test_heartbeat_failures_are_logged_as_warnings_and_it_stops_with_the_worker(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SIDETUNE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing there
    monkeypatch.setenv("SIDETUNE_HEARTBEAT_TTL_S", "0.3")
    caplog.set_level(logging.WARNING, logger="sidetune.watchdog")

    class Consumer:
        from worker.celery_app import app

        app.amqp.queues.select(["train"])

    step = Heartbeat(None)
    step.start(Consumer)
    deadline = time.monotonic() + 10
    while not any("heartbeat failed" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.05)
    step.stop(Consumer)
    assert any(r.levelno == logging.WARNING and "heartbeat failed" in r.getMessage() for r in caplog.records)
    assert step._thread is None
