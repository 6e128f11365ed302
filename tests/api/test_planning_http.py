"""Plans run in the workers (services/jobs/planning.py), over real HTTP against the real processes: `POST /jobs`
answers `planning` at once and the job goes planning -> queued -> extracting -> training -> succeeded; a job its plan
refuses fails with the code and message a dry run answers with; the plan step sent again changes nothing. In-process
(the real app and a real Redis, the plan step run here): a job cancelled while planning is never planned nor sent to
extraction, and the step run twice records one resolved job and asks once for the extract step."""

from __future__ import annotations

import time
import uuid

import httpx
from fastapi.testclient import TestClient

from api.main import create_app
from services.jobs.planning import plan_step
from services.jobs.steps import EXTRACT_NEXT
from storage.redis import JobStore
from storage.settings import Settings
from tests.helpers import plan_failure
from worker.celery_app import enqueue_plan, make_app

BACKBONE = {"name": "test_vit", "pretrained": False}


def digits(running) -> str:
    return str(running.settings.data_path / "datasets" / "digits" / "train")


def test_a_job_answers_planning_then_is_planned_in_a_worker_and_succeeds(stack):
    running, client = stack
    body = {"dataset": {"path": digits(running)}, "backbone": BACKBONE, "method": {"name": "linear"}}
    r = httpx.post(f"{running.api_url}/jobs", json=body, timeout=30)
    assert r.status_code == 201 and r.json()["status"] == "planning", r.text
    job_id = r.json()["id"]
    seen = []
    deadline = time.monotonic() + 300
    while (status := client.job(job_id)["status"]) not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline
        if not seen or seen[-1] != status:
            seen.append(status)
        time.sleep(0.02)
    assert status == "succeeded", client.job(job_id)["error"]
    order = ["planning", "queued", "extracting", "training"]
    assert [order.index(s) for s in seen] == sorted(order.index(s) for s in seen), seen  # never backwards
    messages = [e["message"] for e in client.events(job_id)]
    planned = next(i for i, m in enumerate(messages) if m.startswith("planned: "))
    assert messages[0] == "job queued" and planned < messages.index("extraction started"), messages
    assert "training, " in messages[planned] and "the feature cache for this job needs" in messages[planned]
    store = JobStore.from_url(running.settings.broker_url)
    resolved = store.get_job(job_id)["resolved"]
    assert resolved["images"] > 100 and resolved["weights_hash"]  # the plan step's, then the extract step's
    assert store.get_job(job_id)["handed_off"] == "train"  # each hand-off marked once sent (worker/tasks.py)

    # the plan step sent again (a redelivery): the job is planned already, nothing runs or changes
    enqueue_plan(make_app(running.settings), job_id)
    time.sleep(3)
    again = store.get_job(job_id)
    assert again["status"] == "succeeded" and again["resolved"] == resolved
    assert [e["message"] for e in client.events(job_id)] == messages


def test_a_job_its_plan_refuses_fails_with_the_dry_runs_code_and_message(stack):
    running, client = stack
    root = running.settings.data_path / "datasets" / "tiny_plan"
    for c in ("0", "1"):  # one image a class: nothing left to validate on
        (root / c).mkdir(parents=True, exist_ok=True)
        src = sorted((running.settings.data_path / "datasets" / "digits" / "train" / c).glob("*.png"))[0]
        (root / c / src.name).write_bytes(src.read_bytes())
    body = {"dataset": {"path": str(root)}, "backbone": BACKBONE, "method": {"name": "linear"}}
    dry = httpx.post(f"{running.api_url}/jobs", params={"dry_run": "true"}, json=body, timeout=30)
    assert dry.status_code == 422, dry.text
    error = plan_failure(running.api_url, body)
    assert error == {"code": dry.json()["error"]["code"], "message": dry.json()["error"]["message"]}
    assert error["code"] == "invalid_dataset" and "the validation split is empty" in error["message"]
    (job,) = [j for j in client.jobs(limit=5) if j["spec"]["dataset"]["path"] == str(root)]
    assert JobStore.from_url(running.settings.broker_url).get_job(job["id"])["resolved"] is None
    events = client.events(job["id"])
    assert events[-1]["level"] == "error" and events[-1]["message"] == f"failed: {error['message']}"


def in_process(tmp_path, redis_url, digits_root) -> tuple[TestClient, JobStore, Settings, dict]:
    key = f"key-{uuid.uuid4().hex}"
    settings = Settings(data_dir=tmp_path, redis_url=redis_url, api_keys=[key], allowed_roots=[digits_root])
    client = TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"})
    body = {"dataset": {"path": str(digits_root / "train")}, "backbone": BACKBONE, "method": {"name": "linear"}}
    return client, JobStore.from_url(redis_url), settings, body


def test_a_job_cancelled_while_planning_is_never_planned(tmp_path, redis_url, digits_root):
    client, store, settings, body = in_process(tmp_path, redis_url, digits_root)
    job = client.post("/jobs", json=body).json()
    assert job["status"] == "planning"
    assert client.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"  # at once, as a queued job
    assert plan_step(store, settings, job["id"]) is None  # no extract step asked for
    record = store.get_job(job["id"])
    assert record["status"] == "cancelled" and record["resolved"] is None
    assert not any(e["message"].startswith("planned") for e in store.events(job["id"]))
    assert not (tmp_path / "artifacts" / "jobs" / job["id"]).exists()


def test_the_plan_step_run_twice_plans_once(tmp_path, redis_url, digits_root):
    client, store, settings, body = in_process(tmp_path, redis_url, digits_root)
    job = client.post("/jobs", json=body).json()
    assert store.get_job(job["id"])["resolved"] is None
    assert plan_step(store, settings, job["id"]) == EXTRACT_NEXT  # the task layer enqueues extract on this only
    first = store.get_job(job["id"])
    assert first["status"] == "queued" and first["resolved"]["images"] > 100
    assert plan_step(store, settings, job["id"]) is None  # a redelivery: planned already, nothing asked for
    assert store.get_job(job["id"])["resolved"] == first["resolved"]
    assert sum(e["message"].startswith("planned: ") for e in store.events(job["id"])) == 1
    client.post(f"/jobs/{job['id']}/cancel")
