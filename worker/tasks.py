"""Celery tasks: parse, call the service step, report. All logic lives in services/pipeline.py."""

from __future__ import annotations

from functools import cache

from services.pipeline import extract_step, train_step
from storage.jobs import JobStore
from storage.settings import Settings
from worker.celery_app import TASK_EXTRACT, TASK_TRAIN, app


@cache
def _context() -> tuple[JobStore, Settings]:
    settings = Settings()
    return JobStore.from_url(settings.broker_url), settings


@app.task(name=TASK_EXTRACT, acks_late=True, reject_on_worker_lost=True)
def extract(job_id: str) -> None:
    store, settings = _context()
    extract_step(store, settings, job_id)


@app.task(name=TASK_TRAIN, acks_late=True, reject_on_worker_lost=True)
def train(job_id: str) -> None:
    store, settings = _context()
    train_step(store, settings, job_id)
