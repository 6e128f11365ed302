"""`POST /v1/predict`, several models in one request, over real HTTP: the inference service and the API (forwarding to
it) under uvicorn, a real Redis holding the records and the models trained by `train_job` (tests.helpers.MODELS: side
models and a merged one on test_vit, and a probe on test_vit at 64 px, a second backbone). Each model's predictions
equal its own request's; one request runs one backbone forward per backbone; the 4xx of a bad model list; the CLI
and the client on it."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from api.inference import create_inference_app
from api.main import create_app
from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from services.training.job import train_job
from storage.artifacts import ArtifactStore
from storage.redis import JobStore, now
from storage.settings import Settings
from tests.helpers import MODELS, job_spec, serve
from worker.client import ApiError, Client

SECOND = "model_linear64"  # on test_vit at 64 px: another backbone
MODEL_IDS = [*MODELS, SECOND]
LIMIT = 6  # max_predict_models of the served app


def _record(model_id: str, **extra: object) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created_at": now(),
        "job_id": f"job_{model_id}",
        "owner": None,
        "name": None,
        "method": "linear",
        "mode": "cache",
        "backbone": "test_vit",
        "classes": [str(i) for i in range(10)],
        "metrics": {},
        **extra,
    }


@pytest.fixture(scope="module")
def urls(trained: Settings, digits_root: Path):
    """The inference app (its app object, to watch its backbones) and the API, on `trained`'s models."""
    spec = job_spec(digits_root / "train", {"name": "linear"}, "cache", image_size=64)
    key = run_extraction(spec, trained, NullReporter())["cache_key"]
    out = train_job(spec, trained, key, NullReporter(), trained.data_path / "ckpt" / SECOND)
    ArtifactStore.from_settings(trained).save_model(SECOND, out["weights"], out["manifest"], out["metrics"])
    store = JobStore.from_url(trained.broker_url)
    for model_id in MODEL_IDS:
        store.register_model(_record(model_id))
    store.register_model(_record("model_clips", video={"frames": 8}))  # refused before anything loads it
    settings = trained.model_copy(update={"max_predict_models": LIMIT})
    app = create_inference_app(settings)
    with serve(app) as inference, serve(create_app(settings.model_copy(update={"inference_url": inference}))) as api:
        yield {"inference": inference, "api": api, "app": app}


def _body(images: list[bytes], models: list[str], **extra: object) -> dict:
    return {"models": models, "instances": [{"image_b64": base64.b64encode(b).decode()} for b in images], **extra}


def _scores(predictions: list[dict]) -> np.ndarray:
    return np.array([[p["scores"][str(c)] for c in range(10)] for p in predictions])


@pytest.mark.parametrize("via", ["inference", "api"])
def test_each_models_predictions_equal_its_own_request(urls, images: list[bytes], via: str) -> None:
    url = urls[via]
    r = httpx.post(f"{url}/v1/predict", json=_body(images[:3], MODEL_IDS), timeout=120)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["model_id"] for res in results] == MODEL_IDS  # in the order asked
    for res in results:
        single = {"instances": _body(images[:3], [])["instances"]}
        alone = httpx.post(f"{url}/v1/models/{res['model_id']}:predict", json=single, timeout=120)
        assert alone.status_code == 200, alone.text
        expected = alone.json()["predictions"]
        assert [p["label"] for p in res["predictions"]] == [p["label"] for p in expected], res["model_id"]
        np.testing.assert_allclose(_scores(res["predictions"]), _scores(expected), atol=1e-5)
    top = httpx.post(f"{url}/v1/predict", json=_body(images[:1], MODEL_IDS[:2], top_k=2), timeout=60).json()
    assert all(len(res["predictions"][0]["scores"]) == 2 for res in top["results"])


def test_one_request_runs_one_backbone_forward_per_backbone(urls, images: list[bytes], monkeypatch) -> None:
    predictor = urls["app"].state.predictor
    httpx.post(f"{urls['inference']}/v1/predict", json=_body(images[:1], MODEL_IDS), timeout=120).raise_for_status()
    backbones = {m.backbone_key: m.backbone for m in map(predictor.cached, MODEL_IDS)}
    assert len(backbones) == 2  # test_vit at 160 px and at 64 px
    calls: list[tuple] = []
    for key, backbone in backbones.items():
        original = backbone.intermediates

        def counted(x, layers, key=key, original=original):
            calls.append((key, len(x)))
            return original(x, layers)

        monkeypatch.setattr(backbone, "intermediates", counted)
    r = httpx.post(f"{urls['inference']}/v1/predict", json=_body(images[:4], MODEL_IDS), timeout=120)
    assert r.status_code == 200, r.text
    # the four images once through each backbone, for its three side models or its one (the merged LoRA model is a
    # ViT of its own, run once on them too)
    assert sorted(calls) == sorted((key, 4) for key in backbones)


@pytest.mark.parametrize(
    "models, extra, status, code, named",
    [
        (["model_nope"], {}, 404, "not_found", "model_nope"),
        ([], {}, 422, "invalid_request", "models: the list is empty"),
        (["model_linear"] * 2, {}, 422, "invalid_request", "listed twice"),
        ([f"model_{i}" for i in range(LIMIT + 1)], {}, 422, "too_many_models", f"at most {LIMIT}"),
        (["model_linear", "model_clips"], {}, 400, "invalid_request", "model_clips was trained on videos"),
        (["model_linear", "model_losa3"], {"threshold": 0.5}, 422, "invalid_request", "single-label"),
    ],
)
def test_a_bad_model_list_is_a_4xx_naming_it(urls, images, models, extra, status, code, named) -> None:
    for url in (urls["inference"], urls["api"]):
        r = httpx.post(f"{url}/v1/predict", json=_body(images[:1], models, **extra), timeout=60)
        assert r.status_code == status and r.json()["error"]["code"] == code, r.text
        assert named in r.json()["error"]["message"]


def test_bad_instances_are_named(urls, images) -> None:
    url = urls["inference"]
    r = httpx.post(f"{url}/v1/predict", json=_body([images[0], b"not an image"], MODEL_IDS[:2]), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image" and "instance 1" in r.text
    r = httpx.post(f"{url}/v1/predict", json=_body(images[:1] * 65, MODEL_IDS[:2]), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_images"
    body = {"models": MODEL_IDS[:2], "instances": [{"image_b64": "%%%"}]}
    r = httpx.post(f"{url}/v1/predict", json=body, timeout=60)
    assert r.status_code == 400 and "instances.0.image_b64: not valid base64" in r.text


def test_the_cli_and_the_client_predict_with_several_models(urls, images, tmp_path: Path) -> None:
    files = []
    for i, data in enumerate(images[:2]):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(data)
    models = MODEL_IDS[:2]
    by_client = Client(urls["api"]).predict_many(models, files)
    assert list(by_client) == models
    cli = [sys.executable, "-m", "worker.cli", "predict", ",".join(models), *map(str, files), "--url", urls["api"]]
    r = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert {m: [p["label"] for p in ps] for m, ps in got.items()} == {
        m: [p["label"] for p in ps] for m, ps in by_client.items()
    }
    lines = subprocess.run(cli, capture_output=True, text=True, timeout=300).stdout.strip().splitlines()
    assert len(lines) == 4 and {line.split("\t")[1] for line in lines} == set(models)
    with pytest.raises(ApiError) as info:
        Client(urls["api"]).predict_many(["model_nope"], files)
    assert info.value.status == 404
