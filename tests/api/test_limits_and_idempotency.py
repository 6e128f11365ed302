"""Request size limits (413 before the body is read into memory) and Idempotency-Key on `POST /jobs`, against the
app with a real Redis."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient

from api.main import create_app
from storage.redis import JobStore
from storage.settings import Settings


def make_client(tmp_path, redis_url, digits_root, **overrides) -> tuple[TestClient, dict]:
    settings = Settings(data_dir=tmp_path, redis_url=redis_url, allowed_roots=[digits_root], **overrides)
    body = {
        "dataset": {"path": str(digits_root / "train")},
        "backbone": {"name": "test_vit"},
        "method": {"name": "linear"},
    }
    return TestClient(create_app(settings)), body


def test_a_retry_with_the_same_idempotency_key_returns_the_same_job(tmp_path, redis_url, digits_root):
    client, body = make_client(tmp_path, redis_url, digits_root)
    key = {"Idempotency-Key": f"retry-{tmp_path.name}"}
    first = client.post("/jobs", json=body, headers=key)
    again = client.post("/jobs", json=body, headers=key)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    events = client.get(f"/jobs/{first.json()['id']}/events").json()["data"]
    assert [e["message"] for e in events] == ["job queued"]  # enqueued once

    other = client.post("/jobs", json=body, headers={"Idempotency-Key": f"other-{tmp_path.name}"})
    assert other.json()["id"] != first.json()["id"]
    assert client.post("/jobs", json=body).json()["id"] != first.json()["id"]  # no key: always a new job

    changed = client.post("/jobs", json={**body, "training": {"epochs": 2}}, headers=key)
    assert changed.status_code == 409 and changed.json()["error"]["code"] == "idempotency_key_reused"


def test_idempotency_keys_are_per_api_key(tmp_path, redis_url, digits_root):
    client, body = make_client(tmp_path, redis_url, digits_root, api_keys=["key-a", "key-b"])
    key = f"shared-{tmp_path.name}"
    a = client.post("/jobs", json=body, headers={"Authorization": "Bearer key-a", "Idempotency-Key": key}).json()
    b = client.post("/jobs", json=body, headers={"Authorization": "Bearer key-b", "Idempotency-Key": key}).json()
    assert a["id"] != b["id"]


def test_concurrent_retries_create_one_job(redis_url, tmp_path):
    store = JobStore.from_url(redis_url)
    spec = {"dataset": {"path": "x"}}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: store.create_job_once(f"race-{tmp_path.name}", spec), range(8)))
    assert len({job["id"] for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_bodies_over_the_limit_get_413(tmp_path, redis_url, digits_root):
    client, body = make_client(tmp_path, redis_url, digits_root, max_request_mb=0.01)  # 10 KiB
    big = {**body, "dataset": {**body["dataset"], "path": "x" * 20_000}}
    r = client.post("/jobs", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "SIDETUNE_MAX_REQUEST_MB" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit holds as the body streams in
        for _ in range(20):
            yield b"x" * 1024

    r = client.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    files = [("files", ("a.png", b"\0" * 20_000, "image/png"))]
    r = client.post("/v1/models/mdl_x:predict-files", files=files)
    assert r.status_code == 413

    assert client.post("/jobs", json=body).status_code == 201  # under the limit: served as usual
