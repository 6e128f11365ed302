"""Per-key byte quotas at the API, with a real Redis: uploaded datasets, models and the feature cache. A request that
would pass one is refused with 409 `quota_exceeded` naming the quota, the key's usage and the setting (a job whose
cache would pass the key's cache quota fails `quota_exceeded` when its plan step sizes the cache); deleting gives the
bytes back; another key is not affected."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient

from api.deps import owner_of
from api.main import create_app
from storage.redis import JobStore
from storage.settings import Settings
from tests.api.test_datasets_http import folder, upload, zip_bytes
from tests.helpers import plan_now


def keys() -> tuple[dict, dict]:
    """Two fresh keys (usage is kept per key in Redis across the session)."""
    return {"Authorization": f"Bearer q-{uuid.uuid4().hex}"}, {"Authorization": f"Bearer q-{uuid.uuid4().hex}"}


def app(tmp_path, redis_url, digits_root, a, b, **quotas) -> TestClient:
    tokens = [h["Authorization"].removeprefix("Bearer ") for h in (a, b)]
    settings = Settings(
        data_dir=tmp_path, redis_url=redis_url, allowed_roots=[tmp_path, digits_root], api_keys=tokens, **quotas
    )
    return TestClient(create_app(settings))


def job(digits_root) -> dict:
    return {
        "dataset": {"path": str(digits_root / "train")},
        "backbone": {"name": "test_vit"},
        "method": {"name": "linear"},
    }


def test_uploads_past_a_keys_quota_are_refused_and_deleting_gives_bytes_back(tmp_path, redis_url, digits_root):
    a, b = keys()
    members = folder()
    size = sum(len(data) for data in members.values())  # the extracted files' bytes, what the quota counts
    client = app(tmp_path, redis_url, digits_root, a, b, key_quota_uploads_gb=1.5 * size / 1e9)
    first = upload(client, zip_bytes(members), headers=a)
    assert first.status_code == 201 and first.json()["size_bytes"] == size
    second = upload(client, zip_bytes(members), headers=a)
    assert second.status_code == 409, second.text
    error = second.json()["error"]
    assert error["code"] == "quota_exceeded" and "uploaded datasets quota of this API key exceeded" in error["message"]
    assert f"{size:,} bytes in use" in error["message"] and f"this needs {size:,} bytes" in error["message"]
    assert "SIDETUNE_KEY_QUOTA_UPLOADS_GB" in error["message"]
    assert not [p for p in (tmp_path / "datasets").iterdir() if p.name.startswith("ds_")][1:]  # nothing kept
    assert upload(client, zip_bytes(members), headers=b).status_code == 201  # another key: a quota of its own

    assert client.delete(f"/datasets/{first.json()['id']}", headers=a).status_code == 204
    assert upload(client, zip_bytes(members), headers=a).status_code == 201


def test_a_key_whose_models_reached_the_quota_cannot_submit(tmp_path, redis_url, digits_root):
    a, b = keys()
    client = app(tmp_path, redis_url, digits_root, a, b, key_quota_artifacts_gb=1e-6)  # 1,000 bytes
    owner = owner_of(a["Authorization"].removeprefix("Bearer "))
    model_id = f"model_{uuid.uuid4().hex[:22]}"
    JobStore.from_url(redis_url).register_model(
        {
            "id": model_id,
            "owner": owner,
            "created_at": 1.0,
            "size_bytes": 1500,
            "job_id": "job_" + model_id.removeprefix("model_"),
        }
    )
    refused = client.post("/jobs", json=job(digits_root), headers=a)
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded" and "models quota" in error["message"]
    assert "1,500 bytes in use of at most 1,000 bytes" in error["message"]
    assert "SIDETUNE_KEY_QUOTA_ARTIFACTS_GB" in error["message"]
    assert client.post("/jobs", json=job(digits_root), headers=b).status_code == 201

    assert client.delete(f"/models/{model_id}", headers=a).status_code == 204  # its bytes go back
    assert client.post("/jobs", json=job(digits_root), headers=a).status_code == 201


def test_a_job_whose_cache_cannot_fit_the_keys_quota_is_refused_when_planned(tmp_path, redis_url, digits_root):
    a, b = keys()
    client = app(tmp_path, redis_url, digits_root, a, b, key_quota_cache_gb=1e-6)  # 1,000 bytes
    plan = client.post("/jobs?dry_run=true", json=job(digits_root), headers=a).json()
    submitted = client.post("/jobs", json=job(digits_root), headers=a)  # its cache's size needs the plan: the worker's
    assert submitted.status_code == 201 and submitted.json()["status"] == "planning", submitted.text
    refused = plan_now(client.app, submitted.json()["id"])
    assert refused["status"] == "failed", refused
    error = refused["error"]
    assert error["code"] == "quota_exceeded" and "feature cache quota of this API key exceeded" in error["message"]
    assert f"this needs {plan['expected_cache_bytes']:,} bytes" in error["message"]
    assert "SIDETUNE_KEY_QUOTA_CACHE_GB" in error["message"] and "dry_run" in error["message"]
