"""Celery tasks: parse, call the service step, enqueue what it asks for next. All logic lives in
services/pipeline.py."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from services.pipeline import TRAIN_NEXT, Next, extract_shard_step, extract_step, train_step
from storage.jobs import JobStore, worker_name
from storage.logs import log_context
from storage.settings import Settings
from worker.celery_app import TASK_EXTRACT, TASK_EXTRACT_SHARD, TASK_TRAIN, app, enqueue_shards, enqueue_train

log = logging.getLogger("sidetune.pipeline")


@cache
def _context() -> tuple[JobStore, Settings]:
    settings = Settings()
    return JobStore.from_url(settings.broker_url), settings


def _follow(job_id: str, next_step: Next) -> None:
    if next_step == TRAIN_NEXT:
        enqueue_train(app, job_id)
    elif isinstance(next_step, tuple):
        enqueue_shards(app, job_id, next_step[1])


def _status(store: JobStore, job_id: str) -> str:
    try:
        return store.get_job(job_id)["status"]
    except Exception:  # only for the log line: never mask the step's own outcome
        return "unknown"


@contextmanager
def _running(store: JobStore, job_id: str, step: dict) -> Iterator[None]:
    """Recorded while it runs, so the watchdog can requeue it if this worker dies (a SIGKILL skips `finally`).
    Every log line written meanwhile carries the job id, the step and this worker (storage/logs.py)."""
    task = step["task"] if "index" not in step else f"{step['task']}[{step['index'] + 1}/{step['count']}]"
    with log_context(job_id=job_id, task=task, worker=worker_name()):
        log.info("step %s started", task)
        t0 = time.perf_counter()
        store.step_started(job_id, step)
        try:
            yield
        finally:
            store.step_finished(job_id)
            log.info("step %s finished in %.2fs; job %s", task, time.perf_counter() - t0, _status(store, job_id))


@app.task(name=TASK_EXTRACT, acks_late=True, reject_on_worker_lost=True)
def extract(job_id: str) -> None:
    store, settings = _context()
    with _running(store, job_id, {"task": "extract"}):
        _follow(job_id, extract_step(store, settings, job_id))


@app.task(name=TASK_EXTRACT_SHARD, acks_late=True, reject_on_worker_lost=True)
def extract_shard(job_id: str, index: int, count: int) -> None:
    store, settings = _context()
    with _running(store, job_id, {"task": "extract_shard", "index": index, "count": count}):
        _follow(job_id, extract_shard_step(store, settings, job_id, index, count))


@app.task(name=TASK_TRAIN, acks_late=True, reject_on_worker_lost=True)
def train(job_id: str) -> None:
    store, settings = _context()
    with _running(store, job_id, {"task": "train"}):
        train_step(store, settings, job_id)
