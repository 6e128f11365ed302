"""The Celery app: Redis broker, queues `extract` and `train`, late acks.

Imported by the API to enqueue jobs by task name, so it must not import torch or the tasks' code (the
workers load `worker.tasks` through `include`). Job state lives in the job store, not in a result backend.
"""

from __future__ import annotations

from celery import Celery, group

from storage.settings import Settings

EXTRACT, TRAIN = "extract", "train"
TASK_EXTRACT, TASK_EXTRACT_SHARD, TASK_TRAIN = "sidetune.extract", "sidetune.extract_shard", "sidetune.train"


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    app = Celery("sidetune", broker=settings.broker_url, include=["worker.tasks"])
    # A late-acked task is redelivered after the visibility timeout; keep it above the longest job so
    # long jobs do not run twice (celery#5935, #3430). Every step is idempotent anyway.
    # A step is stopped after job_timeout_s, its worker ended a minute later (worker/tasks.py): redelivery comes later.
    transport = {"visibility_timeout": settings.job_timeout_s + 600}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_routes={
            TASK_EXTRACT: {"queue": EXTRACT},
            TASK_EXTRACT_SHARD: {"queue": EXTRACT},
            TASK_TRAIN: {"queue": TRAIN},
        },  # fmt: skip
        task_default_queue=TRAIN,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


app = make_app()


def enqueue_job(celery: Celery, job_id: str) -> None:
    """The extract step; it enqueues what follows (shard tasks, then the train step) when it is done, so a step
    that fails or is cancelled enqueues nothing."""
    celery.signature(TASK_EXTRACT, args=[job_id], queue=EXTRACT).apply_async()


def enqueue_shards(celery: Celery, job_id: str, count: int) -> None:
    """A group of `count` shard tasks on the extract queue, run by whichever extract workers are free."""
    group(
        celery.signature(TASK_EXTRACT_SHARD, args=[job_id, i, count], queue=EXTRACT) for i in range(count)
    ).apply_async()


def enqueue_train(celery: Celery, job_id: str) -> None:
    celery.signature(TASK_TRAIN, args=[job_id], queue=TRAIN).apply_async()


def requeue_step(celery: Celery, job_id: str, step: dict) -> None:
    """Send a step of a job again (the watchdog, after its worker died); steps are idempotent and resumable."""
    if step["task"] == "extract":
        enqueue_job(celery, job_id)
    elif step["task"] == "extract_shard":
        celery.signature(TASK_EXTRACT_SHARD, args=[job_id, step["index"], step["count"]], queue=EXTRACT).apply_async()
    else:
        enqueue_train(celery, job_id)
