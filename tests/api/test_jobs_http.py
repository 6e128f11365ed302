"""Jobs and predictions over real HTTP against the real processes (Redis, both Celery workers, uvicorn)."""

from __future__ import annotations

import base64
import shutil
import time

import httpx
import pytest

from storage.redis import JobStore

BACKBONE = {"name": "test_vit", "pretrained": False}


def spec(stack, method=None, path=None, **extra):
    running, _ = stack
    return {
        "dataset": {"path": str(path or running.settings.data_path / "datasets" / "digits" / "train")},
        "backbone": BACKBONE,
        "method": method or {"name": "linear"},
        "training": {"epochs": 3, "lr": 0.05},  # one rate: the automatic grid is tested in test_halving.py
        **extra,
    }


def post(stack, body) -> httpx.Response:
    running, _ = stack
    return httpx.post(f"{running.api_url}/jobs", json=body, timeout=30)


def holdout_images(stack, n=6) -> list:
    running, _ = stack
    return sorted((running.settings.data_path / "datasets" / "digits" / "holdout").glob("*/*.png"))[:n]


def test_job_end_to_end_then_cache_reuse_and_predict(stack):
    running, client = stack
    first = client.wait(client.submit(spec(stack, {"name": "losa", "rank": 4}))["id"], timeout_s=300)
    assert first["status"] == "succeeded", first["error"]
    assert first["metrics"]["cache_hit"] is False and first["metrics"]["backbone_forwards"] > 0
    model = httpx.get(f"{running.api_url}/models/{first['model_id']}").json()
    assert model["method"] == "losa" and len(model["classes"]) == 10

    events = client.events(first["id"])
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert sum(e["type"] == "metrics" and "epoch" in e["data"] for e in events) == 3  # one per epoch
    assert any(e["type"] == "metrics" and "val_accuracy" in e["data"] for e in events[-4:])  # the evaluation's
    assert client.events(first["id"], after=len(events) - 1)[0]["seq"] == len(events)

    # a linear probe reads the last block's class token: the LoSA job's cache covers it
    second = client.wait(client.submit(spec(stack, {"name": "linear"}))["id"], timeout_s=300)
    assert second["status"] == "succeeded", second["error"]
    assert second["metrics"]["cache_hit"] is True
    assert second["metrics"]["backbone_forwards"] == 0  # the backbone ran for the first job only
    assert second["cache_key"] == first["cache_key"]

    paths = holdout_images(stack)
    predictions = client.predict(second["model_id"], paths)
    assert len(predictions) == len(paths)
    for p in predictions:
        assert p["label"] in p["scores"] and abs(sum(p["scores"].values()) - 1) < 1e-3

    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    r = httpx.post(f"{running.api_url}/v1/models/{second['model_id']}:predict-files", files=files, timeout=60)
    assert r.status_code == 200
    assert [p["label"] for p in r.json()["predictions"]] == [p["label"] for p in predictions]


def test_every_method_trains_and_predicts_through_the_job_api(stack):
    running, client = stack
    runs = [
        ({"name": "losa", "rank": 4, "layers": 2}, {"mode": "online"}),
        ({"name": "apla", "rank": 4}, {"mode": "images", "augment": True}),
        ({"name": "arc", "rank": 8}, {"mode": "tail", "tail_blocks": 2}),
        ({"name": "lora", "rank": 4}, {"mode": "images"}),
        ({"name": "full"}, {"mode": "images"}),
    ]
    ids = [
        client.submit(spec(stack, method, execution=execution, training={"epochs": 1}))["id"]
        for method, execution in runs
    ]
    paths = holdout_images(stack, n=3)
    for job_id, (method, execution) in zip(ids, runs, strict=True):
        job = client.wait(job_id, timeout_s=300)
        assert job["status"] == "succeeded", (method["name"], job["error"])
        model = httpx.get(f"{running.api_url}/models/{job['model_id']}").json()
        assert (model["method"], model["mode"]) == (method["name"], execution["mode"])
        assert job["metrics"]["side_params"] > 0
        predictions = client.predict(job["model_id"], paths)
        assert len(predictions) == 3 and all(abs(sum(p["scores"].values()) - 1) < 1e-3 for p in predictions)


def test_method_auto_registers_the_chosen_method_and_predicts(stack):
    running, client = stack
    job = client.wait(client.submit(spec(stack, {"name": "auto"}, training={"epochs": 2}))["id"], timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["spec"]["method"] == {"name": "auto"}
    chosen = job["metrics"]["auto"]["selected"]
    assert chosen in ("linear", "losa") and [r["method"] for r in job["metrics"]["auto"]["candidates"]] == [
        "linear",
        "losa",
    ]
    model = httpx.get(f"{running.api_url}/models/{job['model_id']}").json()
    assert model["method"] == chosen and model["metrics"]["auto"]["selected"] == chosen
    predictions = client.predict(job["model_id"], holdout_images(stack, n=2))
    assert len(predictions) == 2 and all(abs(sum(p["scores"].values()) - 1) < 1e-3 for p in predictions)


def test_extraction_shards_run_on_two_extract_workers(stack):
    running, client = stack
    store = JobStore.from_url(running.redis.url)
    running.spawn("extract-worker-2", "worker", "--queues", "extract")
    try:
        deadline = time.monotonic() + 60
        while store.live_workers().get("extract", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert store.live_workers().get("extract", 0) >= 2, "the second extract worker did not start"
        # another image size: a cache family no earlier test filled, so this job must extract
        body = spec(stack, {"name": "losa", "rank": 4}, extraction={"batch_size": 16, "shards": "auto"})
        body["backbone"] = {**BACKBONE, "image_size": 96}
        job = client.wait(client.submit(body)["id"], timeout_s=300)
        assert job["status"] == "succeeded", job["error"]
        assert job["extract_shards"] == 2 and job["metrics"]["cache_hit"] is False
        shard_events = [e["message"] for e in client.events(job["id"]) if e["message"].startswith("shard ")]
        assert len(shard_events) == 2
        workers = {m.rsplit(" on ", 1)[1] for m in shard_events}
        assert len(workers) == 2, shard_events  # each extract worker wrote its own shards
    finally:
        running.retire("extract-worker-2")


def test_mode_that_does_not_suit_the_method_is_422(stack):
    r = post(stack, spec(stack, {"name": "full"}, execution={"mode": "cache"}))
    assert r.status_code == 422
    assert "execution.mode 'cache' is not available for method 'full' (choose images)" in r.json()["error"]["message"]


def test_missing_dataset_path_is_422_naming_the_field(stack):
    running, _ = stack
    r = post(stack, spec(stack, path=running.settings.data_path / "datasets" / "nope"))
    assert r.status_code == 422
    assert "dataset.path" in r.json()["error"]["message"] and "does not exist" in r.json()["error"]["message"]


def test_path_outside_allowed_roots_is_403(stack):
    r = post(stack, spec(stack, path="/etc"))
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden_path"
    assert "outside the allowed roots" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"method": {"name": "nonsense"}}, "method"),
        ({"method": {"name": "losa", "rank": 0}}, "method.rank"),
        ({"training": {"epochs": 0}}, "training.epochs"),
        ({"training": {"lr": "fast"}}, "training.lr"),
        ({"dataset": {"path": "x", "val_fraction": 1.5}}, "dataset.val_fraction"),
    ],
)
def test_invalid_spec_is_422_naming_the_field(stack, change, field):
    r = post(stack, {**spec(stack), **change})
    assert r.status_code == 422
    body = r.json()["error"]
    assert body["code"] == "invalid_request" and field in body["message"]


def test_unknown_backbone_is_refused_at_submission_naming_it(stack):
    r = post(stack, {**spec(stack), "backbone": {"name": "vit_nonexistent_xyz"}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert "backbone.name" in r.json()["error"]["message"] and "vit_nonexistent_xyz" in r.json()["error"]["message"]


def test_corrupt_image_fails_or_is_skipped_as_the_spec_says(stack):
    running, client = stack
    src = running.settings.data_path / "datasets" / "digits" / "train"
    dst = running.settings.data_path / "datasets" / "corrupt"
    shutil.copytree(src, dst)
    (dst / "3" / "broken.png").write_bytes(b"this is not a png")

    failed = client.wait(client.submit(spec(stack, path=dst))["id"], timeout_s=120)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "invalid_dataset" and "broken.png" in failed["error"]["message"]

    body = spec(stack, path=dst)
    body["dataset"]["on_corrupt"] = "skip"
    skipped = client.wait(client.submit(body)["id"], timeout_s=300)
    assert skipped["status"] == "succeeded", skipped["error"]
    assert len(skipped["metrics"]["skipped"]) == 1 and "broken.png" in skipped["metrics"]["skipped"][0]


def test_predict_rejects_bad_input(stack):
    running, client = stack
    job = client.wait(client.submit(spec(stack))["id"], timeout_s=300)
    url = f"{running.api_url}/v1/models/{job['model_id']}:predict"
    not_image = base64.b64encode(b"definitely not an image").decode()
    r = httpx.post(url, json={"instances": [{"image_b64": not_image}]}, timeout=60)
    assert r.status_code == 400 and "instance 0" in r.json()["error"]["message"]
    r = httpx.post(url, json={"instances": [{"image_b64": "%%%"}]}, timeout=60)
    assert r.status_code == 400 and "base64" in r.json()["error"]["message"]
    r = httpx.post(url, json={"instances": []}, timeout=60)
    assert r.status_code == 422
    r = httpx.post(f"{running.api_url}/v1/models/model_missing:predict", json={"instances": [{"image_b64": "AA=="}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_list_jobs_by_cursor(stack):
    running, client = stack
    ids = [client.submit(spec(stack))["id"] for _ in range(3)]
    page = httpx.get(f"{running.api_url}/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = httpx.get(f"{running.api_url}/jobs", params={"limit": 1, "after": ids[1]}).json()
    assert rest["data"][0]["id"] == ids[0]
    assert httpx.get(f"{running.api_url}/jobs/job_unknown").status_code == 404
    for job_id in ids:
        client.wait(job_id, timeout_s=300)


def test_cancel_stops_a_running_job(stack):
    running, client = stack
    body = spec(stack, {"name": "losa", "rank": 4})
    body["training"] = {"epochs": 500}
    job_id = client.submit(body)["id"]
    deadline = time.monotonic() + 120
    while client.job(job_id)["status"] in ("planning", "queued", "extracting") and time.monotonic() < deadline:
        time.sleep(0.2)
    r = httpx.post(f"{running.api_url}/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    job = client.wait(job_id, timeout_s=120)
    assert job["status"] == "cancelled" and job["model_id"] is None


def test_health_and_readiness(stack):
    running, _ = stack
    assert httpx.get(f"{running.api_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{running.api_url}/readyz").json()
    assert ready["status"] == "ready" and ready["workers"]["extract"] >= 1 and ready["workers"]["train"] >= 1
