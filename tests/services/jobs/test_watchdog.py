"""The watchdog against a real Redis: a step whose worker is dead is requeued once; a job that no worker picks
up again within the timeout fails, naming the reason; a live worker's step is left alone."""

from __future__ import annotations

import time

from services.jobs import watchdog
from storage.redis import JobStore, keys
from storage.settings import Settings


def _orphan(store: JobStore, worker: str, step: str) -> dict:
    job = store.create_job({"method": {"name": "linear"}})
    store.r.hset(keys.running(job["id"]), worker, f'{{"task": "{step}"}}')  # as that worker's step_started did
    store.r.sadd(keys.RUNNING, job["id"])
    return job


def test_dead_workers_step_is_requeued_once_then_fails_if_nobody_takes_it(settings: Settings) -> None:
    store = JobStore.from_url(settings.broker_url)
    job = _orphan(store, "gone-host-1", "train")
    requeued: list = []
    strict = settings.model_copy(update={"worker_lost_timeout_s": 0.0})
    watchdog.check(store, strict, lambda job_id, step: requeued.append((job_id, step)))
    assert (job["id"], {"task": "train"}) in requeued
    time.sleep(0.01)
    watchdog.check(store, strict, lambda job_id, step: requeued.append((job_id, step)))
    assert requeued.count((job["id"], {"task": "train"})) == 1  # handed back once
    record = store.get_job(job["id"])
    assert record["status"] == "failed" and record["error"]["code"] == "worker_lost"
    assert "no worker took it up again" in record["error"]["message"]
    assert any("stopped (no heartbeat) during training" in e["message"] for e in store.events(job["id"]))


def test_live_workers_step_is_left_alone_and_repeated_losses_fail_the_job(settings: Settings) -> None:
    store = JobStore.from_url(settings.broker_url)
    store.heartbeat("train", "alive-host-2")
    alive = _orphan(store, "alive-host-2", "train")
    requeued: list = []
    watchdog.check(store, settings, lambda job_id, step: requeued.append(job_id))
    assert alive["id"] not in requeued and store.get_job(alive["id"])["status"] == "queued"

    dead = _orphan(store, "gone-host-3", "extract")
    store.set_fields(dead["id"], workers_lost=settings.max_worker_losses)
    watchdog.check(store, settings, lambda job_id, step: requeued.append(job_id))
    record = store.get_job(dead["id"])
    assert dead["id"] not in requeued and record["status"] == "failed"
    assert f"died {settings.max_worker_losses + 1} times" in record["error"]["message"]


def test_a_dead_workers_plan_step_is_requeued_like_the_others(settings: Settings) -> None:
    store = JobStore.from_url(settings.broker_url)
    job = store.create_job({"method": {"name": "linear"}}, status="planning")
    store.r.hset(keys.running(job["id"]), "gone-host-4", '{"task": "plan"}')  # as that worker's step_started did
    store.r.sadd(keys.RUNNING, job["id"])
    requeued: list = []
    watchdog.check(store, settings, lambda job_id, step: requeued.append((job_id, step)))
    assert (job["id"], {"task": "plan"}) in requeued
    assert store.get_job(job["id"])["status"] == "planning"  # still: the requeued step plans it
    assert any("stopped (no heartbeat) during planning" in e["message"] for e in store.events(job["id"]))
