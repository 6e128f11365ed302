"""`POST /jobs?dry_run=true` returns the plan and creates no job; `POST /jobs` records the job `planning` and its plan
step (services/jobs/planning.py, run here in-process on the API's settings) fails a job whose feature cache cannot fit
the quota, with a message that says what to change (the real app in-process, a real Redis)."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient

from api.main import create_app
from storage.settings import Settings
from tests.helpers import plan_now


def client_for(tmp_path, redis_url, digits_root, **settings) -> tuple[TestClient, dict]:
    key = f"key-{uuid.uuid4().hex}"  # a fresh owner: the session's Redis holds other tests' jobs
    app = create_app(
        Settings(data_dir=tmp_path, redis_url=redis_url, api_keys=[key], allowed_roots=[digits_root], **settings)
    )
    return TestClient(app, headers={"Authorization": f"Bearer {key}"}), {
        "dataset": {"path": str(digits_root / "train")},
        "backbone": {"name": "test_vit", "pretrained": False},
        "method": {"name": "losa", "rank": 4},
    }


def test_dry_run_returns_the_plan_and_creates_no_job(tmp_path, redis_url, digits_root):
    client, body = client_for(tmp_path, redis_url, digits_root)
    r = client.post("/jobs", params={"dry_run": "true"}, json=body)
    assert r.status_code == 200, r.text
    plan = r.json()
    n = plan["images"]
    assert n > 100 and plan["classes"] == 10 and plan["fits"] is True
    assert plan["architecture"]["tokens"] == 101 and plan["cached_layers"] == list(range(6))
    assert plan["cache_bytes"] == n * 6 * 101 * 64 * 2 and plan["extraction_s"] > 0
    assert client.get("/jobs").json()["data"] == []

    online = client.post("/jobs", params={"dry_run": "true"}, json={**body, "execution": {"mode": "online"}}).json()
    assert online["needs_cache"] is False and online["cache_bytes"] is None

    bad = client.post("/jobs", params={"dry_run": "true"}, json={**body, "extraction": {"layers": [7]}})
    assert bad.status_code == 422 and "do not exist" in bad.json()["error"]["message"]


def test_a_job_over_the_cache_quota_is_refused_with_what_to_change(tmp_path, redis_url, digits_root):
    client, body = client_for(tmp_path, redis_url, digits_root, cache_quota_gb=0.0005)
    r = client.post("/jobs", json=body)  # answered at once: the plan step refuses it, failing the job
    assert r.status_code == 201 and r.json()["status"] == "planning", r.text
    refused = plan_now(client.app, r.json()["id"])
    assert refused["status"] == "failed" and refused["resolved"] is None
    error = client.get(f"/jobs/{r.json()['id']}").json()["error"]
    assert error["code"] == "cache_over_quota"
    assert "the feature cache for this job needs" in error["message"] and "Change one of" in error["message"]
    assert "SIDETUNE_CACHE_QUOTA_GB" in error["message"] and 'execution.mode "online"' in error["message"]
    events = client.get(f"/jobs/{r.json()['id']}/events").json()["data"]
    assert events[-1]["level"] == "error" and events[-1]["message"] == f"failed: {error['message']}"

    plan = client.post("/jobs", params={"dry_run": "true"}, json=body)
    assert plan.json()["fits"] is False and plan.json()["message"] == error["message"]

    # a linear probe caches one pooled token per image: it fits, and is queued
    job = client.post("/jobs", json={**body, "method": {"name": "linear"}})
    assert job.status_code == 201 and job.json()["status"] == "planning"
    assert plan_now(client.app, job.json()["id"])["status"] == "queued"
    assert client.post(f"/jobs/{job.json()['id']}/cancel").json()["status"] == "cancelled"
    # a mode without a cache is never refused for it
    online = client.post("/jobs", json={**body, "execution": {"mode": "online"}})
    assert online.status_code == 201
    client.post(f"/jobs/{online.json()['id']}/cancel")


def test_openapi_documents_the_plan(tmp_path, redis_url, digits_root):
    client, _ = client_for(tmp_path, redis_url, digits_root)
    doc = client.get("/openapi.json").json()
    post = doc["paths"]["/jobs"]["post"]
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Plan")
    assert any(p["name"] == "dry_run" and p["description"] for p in post["parameters"])
    assert all(prop.get("description") for prop in doc["components"]["schemas"]["Plan"]["properties"].values())


def test_test_split_problems_are_422_naming_their_field(tmp_path, redis_url, digits_root):
    """Two images a class leave none to test on; a test set with a class the training set lacks cannot be scored;
    the training set is no test set. Each refused at submission, the message starting with the field to change."""
    for folder, classes, count in (("train", ("0", "1"), 2), ("other", ("0", "7"), 1)):
        for c in classes:
            (tmp_path / folder / c).mkdir(parents=True)
            for p in sorted((digits_root / "train" / c).glob("*.png"))[:count]:
                (tmp_path / folder / c / p.name).write_bytes(p.read_bytes())
    client, body = client_for(tmp_path / "data", redis_url, tmp_path)
    assert client.post("/jobs", params={"dry_run": "true"}, json=body).status_code == 200
    for dataset, field, message in (
        ({"test_fraction": 0.3}, "dataset.test_fraction", "leaves no test image"),
        ({"test": str(tmp_path / "other")}, "dataset.test", "classes the training set does not have: '7'"),
        ({"test": str(tmp_path / "train")}, "dataset.test", "dataset.test shares 4 of its 4 files with dataset.path"),
    ):
        r = client.post("/jobs", params={"dry_run": "true"}, json={**body, "dataset": {**body["dataset"], **dataset}})
        error = r.json()["error"]
        assert (r.status_code, error["code"]) == (422, "invalid_dataset"), r.text
        assert error["message"].startswith(f"{field}: ") and message in error["message"]


def test_a_submitted_job_records_its_resolved_job_and_trains_on_its_split(tmp_path, redis_url, digits_root):
    """The record carries what the planner resolved (services/jobs/resolved.py), and the workers' steps train on
    exactly the planner's split: the test images of the model's evaluation are the planner's."""
    from services.jobs.pipeline import TRAIN_NEXT, extract_step, train_step
    from services.jobs.resolved import ResolvedJob
    from storage.artifacts import ArtifactStore
    from storage.redis import JobStore, model_id_for

    client, body = client_for(tmp_path, redis_url, digits_root)
    body = {**body, "method": {"name": "linear"}, "dataset": {**body["dataset"], "test_fraction": 0.2}}
    plan = client.post("/jobs", params={"dry_run": "true"}, json=body).json()
    r = client.post("/jobs", json=body)
    assert r.status_code == 201, r.text
    assert "resolved" not in r.json()  # the record's, not the response's
    job_id = r.json()["id"]
    store = JobStore.from_url(redis_url)
    assert store.get_job(job_id)["resolved"] is None and plan_now(client.app, job_id)["status"] == "queued"
    resolved = ResolvedJob.model_validate(store.get_job(job_id)["resolved"])
    assert (resolved.split.train, resolved.split.val, resolved.split.test) == (
        plan["train_images"],
        plan["val_images"],
        plan["test_images"],
    )
    assert resolved.mode == "cache" and resolved.cached_layers == plan["cached_layers"]
    assert resolved.cached_token_mode == plan["cached_token_mode"] and resolved.weights_hash is None

    # the workers' steps, in this process, on the API's settings
    settings = Settings(data_dir=tmp_path, redis_url=redis_url, allowed_roots=[digits_root])
    assert extract_step(store, settings, job_id) == TRAIN_NEXT
    train_step(store, settings, job_id)
    record = store.get_job(job_id)
    assert record["status"] == "succeeded", record["error"]
    assert record["resolved"]["weights_hash"]
    (used,) = [e["data"]["split"] for e in store.events(job_id) if (e.get("data") or {}).get("split")]
    assert used["parts_sha"] == resolved.split.parts_sha
    report = ArtifactStore.from_settings(settings).read_json(model_id_for(job_id), "evaluation.json")
    assert report["split"] == "test" and report["images"] == resolved.split.test
