"""A worker that dies between finishing its step and enqueueing the next one (services/jobs/watchdog.py): the plan
step's job recorded `queued`, or the extract step's job `extracted`, with nothing sent. The watchdog sends the next
step, once, and the job ends as if nothing happened. The job is submitted through the real app and its steps run
here, against a real Redis; the death is what a SIGKILL leaves: the step recorded as running by a worker with no
heartbeat, and no hand-off marked (worker/tasks.py marks it after sending)."""

from __future__ import annotations

import json
import threading
import time
import uuid

from fastapi.testclient import TestClient

from api.main import create_app
from services.jobs import watchdog
from services.jobs.extract import extract_step
from services.jobs.planning import plan_step
from services.jobs.steps import EXTRACT_NEXT, TRAIN_NEXT
from services.jobs.train import train_step
from storage.redis import JobStore, RunningStep, keys
from storage.settings import Settings


def _submit(settings: Settings, digits_root) -> tuple[JobStore, str]:
    key = f"key-{uuid.uuid4().hex}"
    app_settings = settings.model_copy(update={"api_keys": [key]})
    client = TestClient(create_app(app_settings), headers={"Authorization": f"Bearer {key}"})
    body = {
        "dataset": {"path": str(digits_root / "train")},
        "backbone": {"name": "test_vit", "pretrained": False},
        "method": {"name": "linear"},
        "extraction": {"shards": 1},  # one task, whatever other tests' workers this Redis has seen
    }
    job = client.post("/jobs", json=body).json()
    assert job["status"] == "planning", job
    return JobStore.from_url(settings.broker_url), job["id"]


def _died_in(store: JobStore, job_id: str, step: RunningStep) -> None:
    """What a worker killed inside `step` leaves: the step recorded as running (as `step_started` did) by a worker
    whose heartbeat has gone."""
    store.r.hset(keys.running(job_id), f"gone-{uuid.uuid4().hex[:8]}", json.dumps(step))
    store.r.sadd(keys.RUNNING, job_id)


def _watch(store: JobStore, settings: Settings) -> list[tuple[str, RunningStep]]:
    sent: list[tuple[str, RunningStep]] = []
    watchdog.check(store, settings, lambda job_id, step: sent.append((job_id, step)))
    return sent


def test_a_worker_dying_before_each_hand_off_is_recovered_by_the_watchdog(settings, digits_root) -> None:
    store, job_id = _submit(settings, digits_root)

    assert plan_step(store, settings, job_id) == EXTRACT_NEXT
    _died_in(store, job_id, {"task": "plan"})  # killed before the task layer sent the extract step
    job = store.get_job(job_id)
    assert job["status"] == "queued" and "handed_off" not in job
    assert plan_step(store, settings, job_id) is None  # sent again, the plan step would do nothing: stuck
    assert _watch(store, settings) == [(job_id, {"task": "extract"})]
    job = store.get_job(job_id)
    assert job["handed_off"] == "extract" and job["workers_lost"] == 1 and job["requeued_step"] == "extraction"
    assert _watch(store, settings) == []  # once
    warning = [e for e in store.events(job_id) if e["level"] == "warning"][-1]["message"]
    assert "after planning, before handing the job on; the extraction step is enqueued" in warning

    assert extract_step(store, settings, job_id) == TRAIN_NEXT  # the step the watchdog sent
    _died_in(store, job_id, {"task": "extract"})  # killed before the task layer sent the train step
    assert extract_step(store, settings, job_id) is None  # sent again, it finds the job extracted: stuck
    assert _watch(store, settings) == [(job_id, {"task": "train"})]
    job = store.get_job(job_id)
    assert job["handed_off"] == "train" and job["workers_lost"] == 2 and job["status"] == "extracting"
    assert _watch(store, settings) == []

    train_step(store, settings, job_id)
    job = store.get_job(job_id)
    assert job["status"] == "succeeded" and job["model_id"], job.get("error")


def test_a_worker_dying_after_its_hand_off_has_its_own_step_sent_again(settings, digits_root) -> None:
    """The task layer sent the next step and marked it: the dead worker's step is requeued as before (a rerun that
    finds its work done), and the next step is not sent a second time."""
    store, job_id = _submit(settings, digits_root)
    assert plan_step(store, settings, job_id) == EXTRACT_NEXT
    store.set_fields(job_id, handed_off="extract")  # what worker/tasks.py writes once the extract step is sent
    _died_in(store, job_id, {"task": "plan"})  # killed before `step_finished`
    assert _watch(store, settings) == [(job_id, {"task": "plan"})]
    assert plan_step(store, settings, job_id) is None
    events = [e["message"] for e in store.events(job_id) if e["level"] == "warning"]
    assert events and "during planning; the step is requeued" in events[-1]


def test_a_plan_step_killed_while_planning_is_sent_again(settings, digits_root) -> None:
    store, job_id = _submit(settings, digits_root)
    _died_in(store, job_id, {"task": "plan"})
    assert _watch(store, settings) == [(job_id, {"task": "plan"})]
    assert plan_step(store, settings, job_id) == EXTRACT_NEXT


def test_a_train_step_sent_twice_trains_once_and_takes_over_from_a_dead_holder(settings, digits_root) -> None:
    """A worker that died between sending the train step and marking it leaves the step sent twice (its redelivered
    extract step sends it again). The second waits on the first's lease: while the first trains it does nothing, and
    when the first's lease lapses (its worker died: released here without finishing) it trains the job itself."""
    store, job_id = _submit(settings, digits_root)
    assert plan_step(store, settings, job_id) == EXTRACT_NEXT
    assert extract_step(store, settings, job_id) == TRAIN_NEXT

    first = store.train_lock(job_id)  # another worker's train step, training
    assert first.acquire()
    second = threading.Thread(target=train_step, args=(store, settings, job_id))
    second.start()
    deadline = time.monotonic() + 30
    while not any("sent twice" in e["message"] for e in store.events(job_id)):
        assert time.monotonic() < deadline and second.is_alive(), "the second step neither waited nor said so"
        time.sleep(0.1)
    assert store.get_job(job_id)["status"] == "extracting"  # it waits: no training of its own meanwhile
    assert not any(e["message"] == "training started" for e in store.events(job_id))
    first.release()  # the first worker died: its lease is gone
    second.join(timeout=120)
    job = store.get_job(job_id)
    assert not second.is_alive() and job["status"] == "succeeded", job.get("error")

    train_step(store, settings, job_id)  # a third, after the end: nothing done again
    started = [e for e in store.events(job_id) if e["message"] == "training started"]
    assert len(started) == 1
    assert not store.train_lock(job_id).locked()
