"""Workers in Redis (storage/redis/workers.py) against a real server: heartbeats, running steps, requeued steps and
the turns workers take at the watchdog and the checkpoint sweep."""

from __future__ import annotations

import time

import pytest

from storage.redis import JobStore, worker_name


@pytest.fixture
def store(redis_url: str) -> JobStore:
    s = JobStore.from_url(redis_url.rsplit("/", 1)[0] + "/13")  # a database of its own: exact counts
    s.r.flushdb()
    return s


def test_heartbeats_expire_and_count_per_queue(store: JobStore) -> None:
    store.heartbeat("extract", "w1", ttl_s=0.2)
    store.heartbeat("train", "w1", ttl_s=30)
    store.heartbeat("train", "w2", ttl_s=30)
    assert store.live_workers() == {"extract": 1, "train": 2}
    assert store.worker_alive("w1") and not store.worker_alive("w3")
    time.sleep(0.3)
    assert store.live_workers() == {"train": 2}


def test_a_step_is_running_until_finished_and_dropped_once(store: JobStore) -> None:
    job = store.create_job({})
    store.set_fields(job["id"], requeued_at=1.0)
    store.step_started(job["id"], {"task": "extract"})
    assert store.running_steps() == {job["id"]: {worker_name(): {"task": "extract"}}}
    assert store.get_job(job["id"])["requeued_at"] is None  # taken up
    assert store.drop_step(job["id"], worker_name()) and not store.drop_step(job["id"], worker_name())
    assert store.running_steps() == {}
    store.step_started(job["id"], {"task": "train"})
    store.step_finished(job["id"])
    assert store.running_steps() == {}


def test_requeued_steps_are_kept_until_settled_and_go_with_their_job(store: JobStore) -> None:
    a, b = store.create_job({}), store.create_job({})
    store.workers.mark_requeued(a["id"])
    store.workers.mark_requeued(b["id"])
    assert store.workers.requeued() == {a["id"], b["id"]}
    store.workers.settle_requeued(a["id"])
    assert store.workers.requeued() == {b["id"]}
    store.set_fields(b["id"], status="failed")
    store.delete_job(b["id"])
    assert store.workers.requeued() == set()


def test_one_worker_at_a_time_runs_the_watchdog_and_sweeps(store: JobStore) -> None:
    first, second = store.workers.watchdog_lock(lease_s=5), store.workers.watchdog_lock(lease_s=5)
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    assert store.workers.claim_checkpoint_sweep(every_s=60)
    assert not store.workers.claim_checkpoint_sweep(every_s=60)
