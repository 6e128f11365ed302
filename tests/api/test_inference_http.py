"""The inference service over real HTTP: the Open Inference Protocol v2 with the real `tritonclient[http]` client
(directly and through the API's forwarding), its bad inputs in the protocol's error shape, v1 predict forwarded by
the API, keys and owners enforced by the inference service itself, an incomplete artifact or an unreachable store or
inference service answered with 503, a cold load that does not stall a warm model, and a control plane without torch.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from PIL import Image
from tritonclient.utils import InferenceServerException

from api.inference import create_inference_app
from api.main import create_app
from services.data.digits import write_digits
from storage.artifacts import ArtifactStore
from storage.redis import JobStore, now
from storage.settings import Settings
from tests.helpers import serve
from worker.launcher import free_port


@pytest.fixture(scope="module")
def served(stack) -> tuple[str, list[Path], list[dict]]:
    """A linear probe trained by the stack on digits of its own (its cache family is this module's): the model id,
    held-out PNGs and their v1 predictions through the API."""
    running, client = stack
    root = running.settings.data_path / "datasets" / "digits_v2"
    write_digits(root, limit=80)
    body = {
        "dataset": {"path": str(root / "train")},
        "backbone": {"name": "test_vit", "pretrained": False},
        "method": {"name": "linear"},
        "training": {"epochs": 2},
    }
    job = client.wait(client.submit(body)["id"], timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    paths = sorted((root / "holdout").glob("*/*.png"))[:4]
    return job["model_id"], paths, client.predict(job["model_id"], paths)  # v1, forwarded by the API


def _triton(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)


def _bytes_input(blobs: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(blobs)], "BYTES")
    if binary:
        return tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    data = np.array([base64.b64encode(b) for b in blobs], dtype=np.object_)  # JSON: base64 text per image
    return tensor.set_data_from_numpy(data, binary_data=False)


@pytest.mark.parametrize("via", ["inference", "api"])
def test_tritonclient_infers_like_v1_predict(stack, served, via) -> None:
    running, _ = stack
    model_id, paths, v1 = served
    c = _triton(running.inference_url if via == "inference" else running.api_url)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(model_id)
    meta = c.get_model_metadata(model_id)
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("image", "BYTES"), ("pixels", "UINT8")]
    assert meta["outputs"][1] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    classes = meta["parameters"]["classes"]
    expected = np.array([[p["scores"][k] for k in classes] for p in v1], dtype=np.float32)
    blobs = [p.read_bytes() for p in paths]

    binary = c.infer(model_id, [_bytes_input(blobs)])  # tritonclient's default: binary tensors both ways
    assert [s.decode() for s in binary.as_numpy("label")] == [p["label"] for p in v1]
    np.testing.assert_allclose(binary.as_numpy("probabilities"), expected, atol=1e-5)

    outputs = [triton.InferRequestedOutput("probabilities", binary_data=False)]
    as_json = c.infer(model_id, [_bytes_input(blobs, binary=False)], outputs=outputs, request_id="r-1")
    assert as_json.get_response()["id"] == "r-1" and as_json.as_numpy("label") is None
    np.testing.assert_allclose(as_json.as_numpy("probabilities"), expected, atol=1e-5)

    # the same images as decoded pixels, [N, H, W, 3] uint8
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8").set_data_from_numpy(pixels)
    np.testing.assert_allclose(c.infer(model_id, [tensor]).as_numpy("probabilities"), expected, atol=1e-5)


def _error(c: triton.InferenceServerClient, model_id: str, inputs: list) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        c.infer(model_id, inputs)
    return info.value


def test_bad_v2_input_is_answered_in_the_protocol_shape(stack, served) -> None:
    running, _ = stack
    model_id, paths, _ = served
    c = _triton(running.inference_url)
    png = paths[0].read_bytes()
    e = _error(c, "model_nope", [_bytes_input([png])])
    assert e.status() == "404" and "model_nope" in e.message()
    wrong_type = triton.InferInput("image", [1], "FP32").set_data_from_numpy(np.zeros(1, np.float32))
    e = _error(c, model_id, [wrong_type])
    assert e.status() == "400" and "input 'image': datatype 'FP32', expected BYTES" in e.message()
    flat = np.zeros((2, 3), np.uint8)
    e = _error(c, model_id, [triton.InferInput("pixels", [2, 3], "UINT8").set_data_from_numpy(flat)])
    assert e.status() == "400" and "input 'pixels': shape [2, 3]" in e.message()
    e = _error(c, model_id, [_bytes_input([png, b"not an image"])])
    assert e.status() == "400" and "input 'image': instance 1" in e.message()
    e = _error(c, model_id, [_bytes_input([png] * (running.settings.max_predict_images + 1))])
    assert e.status() == "400" and "input 'image'" in e.message() and "at most" in e.message()
    r = httpx.post(f"{running.inference_url}/v2/models/{model_id}/infer", content=b"{oops", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = httpx.get(f"{running.inference_url}/v2/models/model_nope/ready", timeout=30)
    assert r.status_code == 404 and set(r.json()) == {"error"}


def _register(store: JobStore, model_id: str, owner: str | None, like: dict) -> None:
    store.register_model({**like, "id": model_id, "owner": owner, "created_at": now()})


def _copy(running, src: str, dst: str, owner: str | None = None) -> None:
    """Model `dst`: the artifact and record of `src` under another id (and owner)."""
    store = JobStore.from_url(running.redis.url)
    artifacts = ArtifactStore.from_settings(running.settings)
    for name in ("weights.safetensors", "config.json", "metrics.json"):
        artifacts.model(dst).write_bytes(name, artifacts.model(src).read_bytes(name))
    artifacts.model(dst).seal()
    _register(store, dst, owner, store.get_model(src))


def test_an_incomplete_artifact_is_503_naming_it_never_half_loaded(stack, served) -> None:
    running, _ = stack
    model_id, paths, _ = served
    store = JobStore.from_url(running.redis.url)
    artifacts = ArtifactStore.from_settings(running.settings)
    weights = artifacts.model(model_id).read_bytes("weights.safetensors")
    artifacts.model("model_cut").write_bytes("weights.safetensors", weights)  # uploaded, then cut off: no marker
    _register(store, "model_cut", None, store.get_model(model_id))
    png = base64.b64encode(paths[0].read_bytes()).decode()
    for url in (running.api_url, running.inference_url):
        r = httpx.post(f"{url}/v1/models/model_cut:predict", json={"instances": [{"image_b64": png}]}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_incomplete", r.text
        assert "model_cut is incomplete" in r.json()["error"]["message"] and r.headers["retry-after"]
    e = _error(_triton(running.inference_url), "model_cut", [_bytes_input([paths[0].read_bytes()])])
    assert e.status() == "503" and "model_cut is incomplete" in e.message()
    assert not _triton(running.inference_url).is_model_ready("model_cut")


def test_the_inference_service_checks_keys_and_owners_itself(stack, served) -> None:
    running, _ = stack
    model_id, paths, v1 = served
    settings = running.settings.model_copy(update={"redis_url": running.redis.url, "api_keys": ["key-a", "key-b"]})
    _copy(running, model_id, "model_of_a", owner=hashlib.sha256(b"key-a").hexdigest()[:16])
    body = {"instances": [{"image_b64": base64.b64encode(paths[0].read_bytes()).decode()}]}
    with TestClient(create_inference_app(settings)) as client:
        url = "/v1/models/model_of_a:predict"
        assert client.post(url, json=body).status_code == 401
        assert client.post(url, json=body, headers={"Authorization": "Bearer key-b"}).status_code == 404
        r = client.post(url, json=body, headers={"Authorization": "Bearer key-a"})
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == v1[0]["label"]
        assert client.get("/v2/models/model_of_a", headers={"Authorization": "Bearer key-b"}).json() == {
            "error": "no model 'model_of_a'"
        }
        assert client.get("/v2/health/live").json() == {"live": True}  # health needs no key


def test_a_cold_load_does_not_stall_a_warm_model_nor_park_threads(stack, served) -> None:
    running, _ = stack
    model_id, paths, _ = served
    settings = running.settings.model_copy(update={"redis_url": running.redis.url})
    _copy(running, model_id, "model_cold")
    released = threading.Event()
    app = create_inference_app(settings)
    body = {"instances": [{"image_b64": base64.b64encode(paths[0].read_bytes()).decode()}]}
    with serve(app) as url:
        assert httpx.post(f"{url}/v1/models/{model_id}:predict", json=body, timeout=60).status_code == 200  # warm
        predictor = app.state.predictor
        original = predictor._load

        def slow_load(mid: str):
            if mid == "model_cold":
                assert released.wait(60)
            return original(mid)

        predictor._load = slow_load
        cold = threading.Thread(
            target=lambda: httpx.post(f"{url}/v1/models/model_cold:predict", json=body, timeout=120)
        )
        cold.start()
        time.sleep(0.5)
        t0 = time.perf_counter()
        warm = httpx.post(f"{url}/v1/models/{model_id}:predict", json=body, timeout=60)
        assert warm.status_code == 200 and time.perf_counter() - t0 < 10  # answered while the cold load waits

        # 60 predicts waiting on the cold model hold no thread: a sync route (the model list) still answers
        waiting = [
            threading.Thread(target=lambda: httpx.post(f"{url}/v1/models/model_cold:predict", json=body, timeout=120))
            for _ in range(60)
        ]
        for t in waiting:
            t.start()
        time.sleep(1.0)
        t0 = time.perf_counter()
        assert httpx.get(f"{url}/models", timeout=30).status_code == 200
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
        assert time.perf_counter() - t0 < 5
        released.set()
        for t in [cold, *waiting]:
            t.join(120)


def test_an_unreachable_store_or_inference_service_is_503_with_retry_after(stack, served, s3_server, monkeypatch):
    running, _ = stack
    model_id, paths, _ = served
    from s3fs import S3FileSystem

    store = JobStore.from_url(running.redis.url)
    _register(store, "model_far", None, store.get_model(model_id))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    S3FileSystem.clear_instance_cache()
    settings = running.settings.model_copy(update={"redis_url": running.redis.url, "store_url": "s3://down/x"})
    body = {"instances": [{"image_b64": base64.b64encode(paths[0].read_bytes()).decode()}]}
    try:
        with TestClient(create_inference_app(settings)) as client:
            r = client.post("/v1/models/model_far:predict", json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable", r.text
            assert "s3://down/x" in r.json()["error"]["message"] and r.headers["retry-after"] == "5"
    finally:
        S3FileSystem.clear_instance_cache()

    nowhere = Settings(
        data_dir=running.settings.data_path,
        redis_url=running.redis.url,
        inference_url=f"http://127.0.0.1:{free_port()}",
    )
    with TestClient(create_app(nowhere)) as client:
        r = client.post(f"/v1/models/{model_id}:predict", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "inference_unavailable"
        assert r.headers["retry-after"] == "5"
        assert client.get("/v2/health/ready").json() == {"error": r.json()["error"]["message"]}


def test_the_api_forwards_multipart_predict_files(stack, served) -> None:
    running, _ = stack
    model_id, paths, v1 = served
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    r = httpx.post(f"{running.api_url}/v1/models/{model_id}:predict-files", files=files, timeout=60)
    assert r.status_code == 200 and [p["label"] for p in r.json()["predictions"]] == [p["label"] for p in v1]
    assert r.headers["content-type"] == "application/json"


def _png(side: int, mode: str = "RGB") -> bytes:
    import io

    buf = io.BytesIO()
    Image.new(mode, (side, side), 255 if mode == "1" else (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_limits_are_enforced_from_headers_and_memory_is_returned(stack, served) -> None:
    """An image over 64 Mpx is 400 and a request over the pixel budget is 413, both from the headers, without decoding;
    a large request that is accepted gives its memory back to the OS afterwards."""
    import psutil

    running, _ = stack
    model_id, _, _ = served
    url = f"{running.api_url}/v1/models/{model_id}:predict-files"
    bomb = _png(10_000, "1")  # 100 Mpx in a few kB: Pillow alone decodes up to 128 Mpx
    r = httpx.post(url, files=[("files", ("bomb.png", bomb, "image/png"))], timeout=60)
    assert r.status_code == 400 and "10000x10000 = 100,000,000 pixels" in r.json()["error"]["message"], r.text
    big = _png(7_000, "1")  # 49 Mpx each: three hold more than the 128 Mpx budget
    r = httpx.post(url, files=[("files", (f"{i}.png", big, "image/png")) for i in range(3)], timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pixels", r.text

    inference = psutil.Process(running.procs["inference"].pid)
    large = _png(6_000)  # 36 Mpx, 108 MB decoded
    before = inference.memory_info().rss
    for _ in range(2):
        r = httpx.post(url, files=[("files", (f"{i}.png", large, "image/png")) for i in range(3)], timeout=120)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 3, r.text
    grown = (inference.memory_info().rss - before) / 2**20
    assert grown < 150, f"the inference service kept {grown:.0f} MB after decoding 650 MB of pixels"
