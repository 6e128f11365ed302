"""The worker's heartbeat and watchdog, as a Celery bootstep of the consumer: started once the worker consumes from
the broker, stopped with it (and restarted with the consumer after a lost broker connection).

Every third of `heartbeat_ttl_s` it beats for each queue the worker consumes (what /readyz, `shards: auto` and the
watchdog count), takes its turn at the watchdog (services/jobs/watchdog.py: a Redis lease lets one worker act at a
time), and enforces the hard time limit of the step this worker runs (worker/tasks.py): past `job_timeout_s` plus a
grace period the job fails `job_timeout` and this process ends, so that its supervisor starts a fresh one. Errors (Redis
restarting) are logged as warnings, and the next beat tries again.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from celery import bootsteps

from services.jobs import watchdog
from services.jobs.pipeline import fail
from storage.redis import JobStore, RunningStep, worker_name
from storage.settings import Settings
from worker import tasks
from worker.celery_app import requeue_step

log = logging.getLogger("sidetune.watchdog")


class Heartbeat(bootsteps.StartStopStep):
    requires = {"celery.worker.consumer.tasks:Tasks"}  # consuming

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, consumer) -> None:
        queues = sorted(consumer.app.amqp.queues.consume_from)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(consumer.app, queues), name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self, consumer) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    shutdown = stop

    def _run(self, app, queues: list[str]) -> None:
        settings = Settings()
        store = JobStore.from_url(settings.broker_url, fail_fast=True)  # a missed beat waits for the next one
        every = settings.heartbeat_ttl_s / 3

        def requeue(job_id: str, step: RunningStep) -> None:  # at the job's place among its owner's (fairness)
            requeue_step(app, job_id, step, store.queue_position(job_id))

        while True:
            try:
                beat(store, settings, queues, requeue)
            except Exception as e:  # Redis restarting, say: the next beat tries again
                log.warning("heartbeat failed: %s: %s", type(e).__name__, e)
            if self._stop.wait(every):
                return


def beat(store: JobStore, settings: Settings, queues: list[str], requeue: watchdog.Requeue) -> None:
    """One beat: heartbeats, the hard time limit, then the watchdog if it is this worker's turn."""
    for q in queues:
        store.heartbeat(q, worker_name(), ttl_s=settings.heartbeat_ttl_s)
    enforce_hard_limit(store, settings)
    lock = store.workers.watchdog_lock(lease_s=2 * settings.heartbeat_ttl_s / 3)
    if lock.acquire():
        try:
            for line in watchdog.check(store, settings, requeue):
                log.warning("watchdog: %s", line)
        finally:
            lock.release()


def enforce_hard_limit(store: JobStore, settings: Settings, end=lambda: os._exit(70)) -> bool:
    """If this worker's step has run past `job_timeout_s` plus the grace period (the soft limit could not stop it),
    fail its job and end this process (`end`). True when it did."""
    running = tasks.current
    if running is None:
        return False
    job_id, name, started = running
    limit = settings.job_timeout_s + tasks.HARD_LIMIT_GRACE_S
    if time.monotonic() - started <= limit:
        return False
    message = f"step {name} ran longer than job_timeout_s ({settings.job_timeout_s} s) and did not stop"
    log.error("%s; ending this worker (pid %d) so that a fresh one takes over", message, os.getpid())
    fail(store, job_id, tasks.StepTimeout(message))
    store.step_finished(job_id)
    end()
    return True
