"""The life of jobs and models over real HTTP on the stack: export through the API (forwarded to the inference service)
and its refusals (404, 409 for a failed, cancelled or unfinished job, 422), checkpoints kept after a job, listed,
downloaded and swept after the retention, DELETE of jobs (409 while running) and models (predict then 404s), another
key's records as 404, `has_more` on events."""

from __future__ import annotations

import hashlib
import json
import shutil

import httpx
import onnx
import pytest
from fastapi.testclient import TestClient

from services.jobs.retention import sweep_checkpoints
from storage.artifacts import ArtifactStore
from storage.redis import JobStore, keys, now
from worker.client import ApiError


def job_spec(stack, method: str = "linear", epochs: int = 1, path=None, **options) -> dict:
    running, _ = stack
    return {
        "dataset": {"path": str(path or running.settings.data_path / "datasets" / "digits" / "train")},
        "backbone": {"name": "test_vit", "pretrained": False},
        "method": {"name": method, **options},
        "training": {"epochs": epochs, "lr": 0.05},
    }


@pytest.fixture(scope="module")
def finished(stack) -> dict:
    """A LoSA side network trained for 2 epochs on the stack (checkpointed after each)."""
    _, client = stack
    job = client.wait(client.submit(job_spec(stack, "losa", epochs=2, rank=4))["id"], timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    return job


def test_export_through_the_api_and_the_inference_service(stack, finished, tmp_path) -> None:
    running, client = stack
    path = client.export(finished["model_id"], "onnx", tmp_path / "m.onnx")
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["classes"]) == [str(i) for i in range(10)] and meta["model_id"] == finished["model_id"]
    r = httpx.get(
        f"{running.inference_url}/models/{finished['model_id']}/export", params={"format": "adapter"}, timeout=120
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert f'filename="{finished["model_id"]}-adapter.zip"' in r.headers["content-disposition"]


def test_export_refusals_name_the_cause(stack, finished) -> None:
    running, client = stack

    def refused(model_id: str, fmt: str = "onnx") -> tuple[int, str, str]:
        r = httpx.get(f"{running.api_url}/models/{model_id}/export", params={"format": fmt}, timeout=120)
        return r.status_code, r.json()["error"]["code"], r.json()["error"]["message"]

    assert refused("model_nope") == (404, "not_found", "no model 'model_nope'")
    status, code, message = refused(finished["model_id"], "tflite")
    assert (status, code) == (422, "invalid_request") and "format" in message
    assert "'timm', 'onnx', 'adapter', 'mlflow' or 'hf'" in message

    mean = client.wait(client.submit(job_spec(stack, pool="mean"))["id"], timeout_s=300)
    status, code, message = refused(mean["model_id"], "timm")
    assert (status, code) == (422, "export_unsupported") and "pools `mean`" in message and "onnx" in message

    broken = running.settings.data_path / "datasets" / "broken"
    shutil.copytree(running.settings.data_path / "datasets" / "digits" / "train", broken)
    (broken / "3" / "broken.png").write_bytes(b"not a png")
    failed = client.wait(client.submit(job_spec(stack, path=broken))["id"], timeout_s=120)
    status, code, message = refused("model_" + failed["id"].removeprefix("job_"))
    assert (status, code) == (409, "job_failed") and failed["id"] in message and "broken.png" in message

    queued = client.submit(job_spec(stack, "losa", epochs=20, rank=4))
    status, code, message = refused("model_" + queued["id"].removeprefix("job_"))
    assert (status, code) == (409, "model_not_ready") and "the model is registered when the job succeeds" in message
    with pytest.raises(ApiError) as e:  # a job that has not ended cannot be deleted
        client.delete_job(queued["id"])
    assert e.value.status == 409 and e.value.code == "job_not_finished" and "cancel it first" in str(e.value)
    client.cancel(queued["id"])
    assert client.wait(queued["id"], timeout_s=120)["status"] == "cancelled"
    assert refused("model_" + queued["id"].removeprefix("job_"))[:2] == (409, "job_cancelled")
    client.delete_job(queued["id"])
    for path in (f"/jobs/{queued['id']}", f"/jobs/{queued['id']}/events"):
        assert httpx.get(f"{running.api_url}{path}", timeout=30).status_code == 404
    assert queued["id"] not in [j["id"] for j in client.jobs(limit=100)]


def test_checkpoints_are_kept_listed_then_swept(stack, finished) -> None:
    running, client = stack
    listing = client.checkpoints(finished["id"])
    files = {c["name"]: c for c in listing["data"]}
    assert set(files) == {"checkpoint.safetensors", "checkpoint.json"}
    assert files["checkpoint.json"]["epoch"] == 2 and files["checkpoint.json"]["best_epoch"] in (1, 2)
    assert all(c["size_bytes"] > 0 and c["created_at"] >= finished["created_at"] for c in listing["data"])
    assert listing["expires_at"] == pytest.approx(finished["finished_at"] + 24 * 3600, abs=1e-3)
    r = httpx.get(f"{running.api_url}/jobs/{finished['id']}/checkpoints/checkpoint.json", timeout=30)
    assert r.status_code == 200 and r.json()["epoch"] == 2
    bad = httpx.get(f"{running.api_url}/jobs/{finished['id']}/checkpoints/nope.bin", timeout=30)
    assert bad.status_code == 404 and "no checkpoint file 'nope.bin'" in bad.json()["error"]["message"]

    store = JobStore.from_url(running.redis.url)
    assert finished["id"] not in sweep_checkpoints(store, running.settings, force=True)  # within the retention
    expired = running.settings.model_copy(update={"checkpoint_retention_h": 0.0})
    store.r.delete(keys.SWEEP_CHECKPOINTS)
    sweep_checkpoints(store, running.settings)  # a sweep (or the workers' watchdog) ran: none for a few minutes
    assert sweep_checkpoints(store, expired) == [] and len(client.checkpoints(finished["id"])["data"]) == 2
    assert finished["id"] in sweep_checkpoints(store, expired, force=True)
    assert client.checkpoints(finished["id"])["data"] == []


def test_events_page_with_has_more(stack, finished) -> None:
    _, client = stack
    first = client.event_page(finished["id"], limit=2)
    assert len(first["data"]) == 2 and first["has_more"] is True
    rest = client.event_page(finished["id"], after=2, limit=1000)
    assert rest["has_more"] is False and [e["seq"] for e in rest["data"]][0] == 3
    assert all("created_at" in e for e in first["data"] + rest["data"])


def test_delete_a_model_then_its_job(stack, finished, tmp_path) -> None:
    running, client = stack
    model_id = finished["model_id"]
    image = sorted((running.settings.data_path / "datasets" / "digits" / "holdout").glob("*/*.png"))[0]
    assert client.predict(model_id, [image])
    client.delete_model(model_id)
    for call in (
        lambda: client.predict(model_id, [image]),
        lambda: client.model(model_id),
        lambda: client.export(model_id, "onnx", tmp_path / "x.onnx"),
        lambda: client.delete_model(model_id),
    ):
        with pytest.raises(ApiError) as e:
            call()
        assert e.value.status == 404 and model_id in str(e.value)
    assert not ArtifactStore.from_settings(running.settings).model(model_id).files()
    job = client.job(finished["id"])
    assert job["model_id"] is None and client.events(finished["id"], after=0, limit=1000)[-1]["message"] == (
        f"model {model_id} deleted"
    )
    client.delete_job(finished["id"])
    assert finished["id"] not in [j["id"] for j in client.jobs(limit=100)]


def test_another_keys_records_are_404_to_delete(stack) -> None:
    running, _ = stack
    from api.main import create_app

    store = JobStore.from_url(running.redis.url)
    owner_a = hashlib.sha256(b"key-a").hexdigest()[:16]
    job = store.create_job({"method": {"name": "linear"}}, owner=owner_a)
    store.set_fields(job["id"], status="succeeded", finished_at=now())
    store.register_model(
        {
            "id": "model_of_key_a",
            "object": "model",
            "created_at": now(),
            "job_id": job["id"],
            "owner": owner_a,
            "method": "linear",
            "backbone": "test_vit",
            "classes": [],
            "metrics": {},
        }
    )
    settings = running.settings.model_copy(update={"redis_url": running.redis.url, "api_keys": ["key-a", "key-b"]})
    with TestClient(create_app(settings)) as http:
        b, a = {"Authorization": "Bearer key-b"}, {"Authorization": "Bearer key-a"}
        for path in (f"/jobs/{job['id']}", "/models/model_of_key_a"):
            assert http.delete(path).status_code == 401
            r = http.delete(path, headers=b)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert http.delete("/models/model_of_key_a", headers=a).status_code == 204
        assert http.delete(f"/jobs/{job['id']}", headers=a).status_code == 204
        assert http.get(f"/jobs/{job['id']}", headers=a).status_code == 404
