"""Celery tasks: parse, call the service step, enqueue what it asks for next. All logic lives in
services/pipeline.py."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from services.pipeline import TRAIN_NEXT, Next, extract_shard_step, extract_step, train_step
from storage.jobs import JobStore
from storage.settings import Settings
from worker.celery_app import TASK_EXTRACT, TASK_EXTRACT_SHARD, TASK_TRAIN, app, enqueue_shards, enqueue_train


@cache
def _context() -> tuple[JobStore, Settings]:
    settings = Settings()
    return JobStore.from_url(settings.broker_url), settings


def _follow(job_id: str, next_step: Next) -> None:
    if next_step == TRAIN_NEXT:
        enqueue_train(app, job_id)
    elif isinstance(next_step, tuple):
        enqueue_shards(app, job_id, next_step[1])


@contextmanager
def _running(store: JobStore, job_id: str, step: dict) -> Iterator[None]:
    """Recorded while it runs, so the watchdog can requeue it if this worker dies (a SIGKILL skips `finally`)."""
    store.step_started(job_id, step)
    try:
        yield
    finally:
        store.step_finished(job_id)


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
