"""Celery tasks: parse, call the service step, enqueue what it asks for next. All logic lives in
services/jobs/pipeline.py. Each step runs under `_step`, which records it as running (for the watchdog), bounds its time
and retries what a retry may cure:

- Time: a step longer than `job_timeout_s` is interrupted (a SIGALRM in this, the worker's main thread, where the
  solo pool runs tasks: Celery's own time limits need the prefork pool) and the job fails `job_timeout`. A step
  that does not return even then (stuck in C code) is the hard limit's: the heartbeat bootstep
  (worker/heartbeat.py) fails the job and ends this worker, which its supervisor starts again.
- Transient errors (the store or Redis unreachable, Redis refusing writes) are retried with backoff, `RETRIES`
  times, before the job fails: storage/faults.py's `TASK` policy, the longer half of the one retry policy (store
  operations retry briefly inside each call first).
- Memory: after each step the garbage it left in reference cycles is collected and the freed heap handed back to the
  OS (`release_memory`), so a worker that runs for days holds what it uses, not what its last jobs left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from celery import Task

from services.errors import UserError, transient
from services.jobs.pipeline import (
    EXTRACT_NEXT,
    TRAIN_NEXT,
    Next,
    extract_shard_step,
    extract_step,
    fail,
    plan_step,
    train_step,
)
from services.jobs.progress import JobReporter
from storage.faults import TASK
from storage.logs import log_context
from storage.redis import JobStore, NotFound, RunningStep, worker_name
from storage.settings import Settings
from worker.celery_app import (
    TASK_EXTRACT,
    TASK_EXTRACT_SHARD,
    TASK_PLAN,
    TASK_TRAIN,
    app,
    enqueue_job,
    enqueue_shards,
    enqueue_train,
)

log = logging.getLogger("sidetune.pipeline")
RETRIES = TASK.attempts - 1  # after 5, 10, 20 and 40 s; the job fails if the fifth try meets a transient error too
RETRY_BASE_S = TASK.first_s
HARD_LIMIT_GRACE_S = 60.0  # after the soft limit, how long a step may still take to stop before its worker is ended

# The step this worker runs now, for the hard time limit: (job id, task, monotonic start) or None.
current: tuple[str, str, float] | None = None


class StepTimeout(UserError):
    """A step ran longer than `job_timeout_s`."""

    code = "job_timeout"


@cache
def _context() -> tuple[JobStore, Settings]:
    settings = Settings()
    return JobStore.from_url(settings.broker_url), settings


def _follow(job_id: str, next_step: Next) -> None:
    """Enqueue the step the finished one asks for; a hand-off to the extract or train step is marked on the job once
    sent (`handed_off`, last), so that the watchdog tells a worker that died before sending it (the job planned or
    extracted, nothing enqueued: it sends the next step itself) from one that died after (services/jobs/watchdog.py)."""
    if next_step is None:
        return
    store = _context()[0]
    position = store.queue_position(job_id)  # fairness between keys (worker/celery_app.py)
    if next_step == EXTRACT_NEXT:
        enqueue_job(app, job_id, position)
    elif next_step == TRAIN_NEXT:
        enqueue_train(app, job_id, position)
    elif isinstance(next_step, tuple):
        enqueue_shards(app, job_id, next_step[1], position)
    if next_step in (EXTRACT_NEXT, TRAIN_NEXT):
        with contextlib.suppress(NotFound):  # ended and deleted meanwhile: nothing left to mark
            store.set_fields(job_id, handed_off=next_step)


def _status(store: JobStore, job_id: str) -> str:
    try:
        return store.get_job(job_id)["status"]
    except Exception:  # only for the log line: never mask the step's own outcome
        return "unknown"


@contextmanager
def _time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise StepTimeout in this thread after `seconds` (main thread only: elsewhere the hard limit alone applies)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _expired(signum: int, _frame: object) -> None:
        raise StepTimeout(
            f"{what} ran longer than job_timeout_s ({seconds:.0f} s); raise SIDETUNE_JOB_TIMEOUT_S "
            "or make the job smaller"
        )

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def _step(task: Task, job_id: str, step: RunningStep) -> Iterator[None]:
    """Recorded while it runs, so the watchdog can requeue it if this worker dies (a SIGKILL skips `finally`);
    bounded in time; retried on transient errors. Every log line written meanwhile carries the job id, the step and
    this worker (storage/logs.py)."""
    global current
    store, settings = _context()
    name = step["task"] if "index" not in step else f"{step['task']}[{step['index'] + 1}/{step['count']}]"
    with log_context(job_id=job_id, task=name, worker=worker_name()):
        log.info("step %s started", name)
        t0 = time.perf_counter()
        store.step_started(job_id, step)
        current = (job_id, name, time.monotonic())
        try:
            with _time_limit(settings.job_timeout_s, f"step {name}"):
                yield
        except StepTimeout as e:  # the alarm rang outside the step's own error handling
            fail(store, job_id, e)
        except Exception as e:
            if not transient(e):
                raise
            retries = task.request.retries
            if retries >= RETRIES:
                fail(store, job_id, e)
                return
            delay = min(TASK.cap_s, RETRY_BASE_S * 2**retries)
            log.warning("step %s: %s; retrying in %.0f s (%d/%d)", name, e, delay, retries + 1, RETRIES)
            reporter = JobReporter(store, job_id)  # best effort: Redis may be refusing writes, the retry must go on
            reporter.event(f"{name}: {e}; retrying in {delay:.0f} s ({retries + 1}/{RETRIES})", level="warning")
            raise task.retry(exc=e, countdown=delay, max_retries=RETRIES) from None
        finally:
            current = None
            store.step_finished(job_id)
            log.info("step %s finished in %.2fs; job %s", name, time.perf_counter() - t0, _status(store, job_id))
            release_memory()


def release_memory() -> None:
    """Collect garbage held in reference cycles (matplotlib's figures, torch modules): with torch loaded, millions of
    long-lived objects make Python's full collections rare, so a step's cyclic garbage waited for dozens of later jobs
    (the train worker's RSS crept up over a soak); then hand the heap pages freed back to the OS, which glibc keeps
    otherwise."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to hand back
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@app.task(name=TASK_PLAN, bind=True, acks_late=True, reject_on_worker_lost=True)
def plan(self: Task, job_id: str) -> None:
    store, settings = _context()
    with _step(self, job_id, {"task": "plan"}):
        _follow(job_id, plan_step(store, settings, job_id))


@app.task(name=TASK_EXTRACT, bind=True, acks_late=True, reject_on_worker_lost=True)
def extract(self: Task, job_id: str) -> None:
    store, settings = _context()
    with _step(self, job_id, {"task": "extract"}):
        _follow(job_id, extract_step(store, settings, job_id))


@app.task(name=TASK_EXTRACT_SHARD, bind=True, acks_late=True, reject_on_worker_lost=True)
def extract_shard(self: Task, job_id: str, index: int, count: int) -> None:
    store, settings = _context()
    with _step(self, job_id, {"task": "extract_shard", "index": index, "count": count}):
        _follow(job_id, extract_shard_step(store, settings, job_id, index, count))


@app.task(name=TASK_TRAIN, bind=True, acks_late=True, reject_on_worker_lost=True)
def train(self: Task, job_id: str) -> None:
    store, settings = _context()
    with _step(self, job_id, {"task": "train"}):
        train_step(store, settings, job_id)
