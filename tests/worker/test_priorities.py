"""Fair scheduling on the broker itself: steps sent by worker/celery_app.py with their queue positions come out of a
real Redis, through kombu's BRPOP consumer (as a worker takes them), lowest position first and in submission order
within one; one list per level, so positions 1 and 2 are not lumped with 0 (kombu's default steps are 0, 3, 6, 9)."""

from __future__ import annotations

from pathlib import Path

import kombu

from storage.settings import Settings
from worker.celery_app import (
    EXTRACT,
    LOWEST,
    TASK_PLAN,
    enqueue_job,
    enqueue_train,
    make_app,
    priority,
    requeue_step,
)


def test_positions_map_to_levels_and_cap_at_the_lowest() -> None:
    assert [priority(p) for p in (-1, 0, 1, 2, 9, 10, 400)] == [0, 0, 1, 2, 9, 9, 9]
    assert LOWEST == 9


def test_a_worker_takes_the_lowest_position_first(tmp_path: Path, redis_url: str) -> None:
    settings = Settings(data_dir=tmp_path, redis_url=redis_url.rsplit("/", 1)[0] + "/11")  # no worker reads it
    celery = make_app(settings)
    with celery.connection_for_write() as conn:
        conn.default_channel.queue_purge(EXTRACT)
    # key A's backlog (positions 0..11 in order), then key B's first job (position 0), a requeued step of A's at
    # position 1, and a train step (another queue: not taken here)
    sent = [(f"a{i}", i) for i in range(12)] + [("b0", 0)]
    for job_id, position in sent:
        enqueue_job(celery, job_id, position)
    requeue_step(celery, "a1-again", {"task": "extract"}, 1)
    enqueue_train(celery, "a0", 0)

    taken: list[str] = []
    with celery.connection_for_read() as conn:

        def take(body, message) -> None:
            taken.append(body[0][0])  # protocol 2: (args, kwargs, embed)
            message.ack()

        queue = kombu.Queue(EXTRACT, routing_key=EXTRACT)
        with conn.Consumer(queue, callbacks=[take], prefetch_count=1, accept=["json"]):
            while len(taken) < len(sent) + 1:
                conn.drain_events(timeout=10)
    # level 0: a0, then b0 (B's first job waits for A's first only); level 1: a1, then the requeued step; then A's
    # backlog in order, its positions 9 and above sharing the lowest level in submission order
    assert taken == ["a0", "b0", "a1", "a1-again", *(f"a{i}" for i in range(2, 12))]


def test_a_requeued_plan_step_is_the_plan_task_on_the_extract_queue(tmp_path: Path, redis_url: str) -> None:
    settings = Settings(data_dir=tmp_path, redis_url=redis_url.rsplit("/", 1)[0] + "/12")  # no worker reads it
    celery = make_app(settings)
    with celery.connection_for_write() as conn:
        conn.default_channel.queue_purge(EXTRACT)
    requeue_step(celery, "job_planning", {"task": "plan"}, 0)
    taken: list = []
    with celery.connection_for_read() as conn:

        def take(body, message) -> None:
            taken.append((message.headers["task"], body[0]))
            message.ack()

        with conn.Consumer(kombu.Queue(EXTRACT, routing_key=EXTRACT), callbacks=[take], accept=["json"]):
            conn.drain_events(timeout=10)
    assert taken == [(TASK_PLAN, ["job_planning"])]
