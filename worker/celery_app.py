"""The Celery app: Redis broker, queues `extract` (the plan and extract steps) and `train`, late acks, and fair
scheduling between API keys.

Imported by the API to enqueue jobs by task name, so it must not import torch or the tasks' code (the
workers load `worker.tasks` through `include`). Job state lives in the job store, not in a result backend.

Fairness: every step is sent with a priority, the number of its owner's unfinished jobs submitted before it
(`JobStore.queue_position`), capped at LOWEST. Kombu's Redis transport keeps one list per priority level of a queue
and a worker's BRPOP names them from level 0 up, so it takes the first waiting step of the lowest level: a key's first
job waits only for other keys' first jobs, its second for their second ones, and so on (round-robin between keys up
to the cap; beyond it, submission order). A worker holds no backlog: with late acks, a prefetch multiplier of 1 and
the solo pool it reserves one message, the one it runs (a retried step's countdown is held by the worker, celery#3640).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery import Celery, group

from storage.settings import Settings

if TYPE_CHECKING:
    from storage.redis import RunningStep

EXTRACT, TRAIN = "extract", "train"
LOWEST = 9  # kombu's Redis transport takes priorities 0 (served first) to 9
TASK_EXTRACT, TASK_EXTRACT_SHARD, TASK_TRAIN = "sidetune.extract", "sidetune.extract_shard", "sidetune.train"
TASK_PLAN = "sidetune.plan"


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    app = Celery("sidetune", broker=settings.broker_url, include=["worker.tasks"])
    # A late-acked task is redelivered after the visibility timeout; keep it above the longest job so
    # long jobs do not run twice (celery#5935, #3430). Every step is idempotent anyway.
    # A step is stopped after job_timeout_s, its worker ended a minute later (worker/tasks.py): redelivery comes later.
    transport = {"visibility_timeout": settings.job_timeout_s + 600}
    # One list per priority level (the default steps 0, 3, 6, 9 would put positions 1 and 2 with 0). The API sends
    # and the workers receive with these, so every process must agree on them.
    transport["priority_steps"] = list(range(LOWEST + 1))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_routes={
            TASK_PLAN: {"queue": EXTRACT},
            TASK_EXTRACT: {"queue": EXTRACT},
            TASK_EXTRACT_SHARD: {"queue": EXTRACT},
            TASK_TRAIN: {"queue": TRAIN},
        },
        task_default_queue=TRAIN,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


app = make_app()


def priority(position: int) -> int:
    """The priority of a step whose job has `position` of its owner's unfinished jobs before it (0 is served first)."""
    return max(0, min(position, LOWEST))


def enqueue_plan(celery: Celery, job_id: str, position: int = 0) -> None:
    """The plan step of a job recorded `planning` (on the extract queue: its workers read datasets); it asks for the
    extract step once the job is planned. `position`: `JobStore.queue_position` of the job (fairness)."""
    celery.signature(TASK_PLAN, args=[job_id], queue=EXTRACT, priority=priority(position)).apply_async()


def enqueue_job(celery: Celery, job_id: str, position: int = 0) -> None:
    """The extract step; it enqueues what follows (shard tasks, then the train step) when it is done, so a step
    that fails or is cancelled enqueues nothing. `position`: `JobStore.queue_position` of the job (fairness)."""
    celery.signature(TASK_EXTRACT, args=[job_id], queue=EXTRACT, priority=priority(position)).apply_async()


def enqueue_shards(celery: Celery, job_id: str, count: int, position: int = 0) -> None:
    """A group of `count` shard tasks on the extract queue, run by whichever extract workers are free."""
    group(
        celery.signature(TASK_EXTRACT_SHARD, args=[job_id, i, count], queue=EXTRACT, priority=priority(position))
        for i in range(count)
    ).apply_async()


def enqueue_train(celery: Celery, job_id: str, position: int = 0) -> None:
    celery.signature(TASK_TRAIN, args=[job_id], queue=TRAIN, priority=priority(position)).apply_async()


def requeue_step(celery: Celery, job_id: str, step: RunningStep, position: int = 0) -> None:
    """Send a step of a job again (the watchdog, after its worker died); steps are idempotent and resumable."""
    if step["task"] == "plan":
        enqueue_plan(celery, job_id, position)
    elif step["task"] == "extract":
        enqueue_job(celery, job_id, position)
    elif step["task"] == "extract_shard":
        celery.signature(
            TASK_EXTRACT_SHARD, args=[job_id, step["index"], step["count"]], queue=EXTRACT, priority=priority(position)
        ).apply_async()
    else:
        enqueue_train(celery, job_id, position)
