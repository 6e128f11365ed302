"""Dynamic micro-batching of predict requests (services/serving/batching.py) with real models on test_vit: concurrent
requests get what sequential `Predictor.predict` calls give, share backbone passes, respect the batch size, and fail
alone on their own bad input; and the API's predict route goes through the batcher.

To make "requests that arrive together" deterministic, the backbone's `forward_intermediates` is wrapped: it counts
calls and images, and its first call waits at a gate until the other requests have queued (the computation itself is
timm's)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient

from services.data.datasets import DatasetError
from services.serving.batching import Batcher
from services.serving.inference import Predictor
from storage.redis import JobStore, now
from storage.settings import Settings
from tests.helpers import MODELS


class Gate:
    """Wraps the backbone's forward_intermediates: records the batch size of every call; the first call waits until
    `open()` (so that the requests sent meanwhile queue up behind it)."""

    def __init__(self, predictor: Predictor, model_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[int] = []
        self._open = threading.Event()
        model = predictor.load(model_id).backbone.model
        original = model.forward_intermediates

        def counted(x, *args, **kwargs):
            self.calls.append(len(x))
            if len(self.calls) == 1:
                assert self._open.wait(30), "the gate was never opened"
            return original(x, *args, **kwargs)

        monkeypatch.setattr(model, "forward_intermediates", counted)

    def open(self) -> None:
        self._open.set()


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def send_together(batcher: Batcher, gate: Gate, requests: list[tuple[str, list[bytes]]]) -> list:
    """Sends requests[0], and while its batch is held at the gate the others from one thread each; opens the gate
    once they have all queued (or failed). Returns each request's predictions or exception, in order."""
    results: list = [None] * len(requests)
    settled = threading.Semaphore(0)  # released by each request that failed before queueing

    def send(i: int) -> None:
        try:
            results[i] = batcher.predict(*requests[i])
        except Exception as e:  # noqa: BLE001 - checked by the test
            results[i] = e
            settled.release()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    threads[0].start()
    wait_for(lambda: len(gate.calls) == 1)
    for t in threads[1:]:
        t.start()
    failed = 0

    def all_in() -> bool:
        nonlocal failed
        while settled.acquire(blocking=False):
            failed += 1
        return len(batcher._queue) + failed == len(requests) - 1

    wait_for(all_in)
    gate.open()
    for t in threads:
        t.join(60)
    return results


def assert_same(got: list[dict], expected: list[dict]) -> None:
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(list(g["scores"].values()), list(e["scores"].values()), atol=1e-5)


@pytest.mark.parametrize("model_ids", [["model_losa_all"], list(MODELS)], ids=["one-model", "several-models"])
def test_concurrent_requests_match_sequential_and_share_backbone_passes(
    trained: Settings, images: list[bytes], model_ids: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = [(model_ids[i % len(model_ids)], images[i % 7 : i % 7 + 1 + i % 3]) for i in range(12)]
    reference = Predictor(trained)
    expected = [reference.predict(m, imgs) for m, imgs in requests]

    predictor = Predictor(trained)
    batcher = Batcher(predictor, max_batch=64, max_wait_s=0.0)
    for m in model_ids:  # loaded before the gate wraps the backbone, which the merged model_lora copies
        predictor.load(m)
    gate = Gate(predictor, model_ids[0], monkeypatch)
    results = send_together(batcher, gate, requests)
    batcher.close()

    for got, exp in zip(results, expected, strict=True):
        assert not isinstance(got, Exception), got
        assert_same(got, exp)
    # the first request ran alone; all others had queued behind it and ran as one batch, whose side-model images
    # went through ONE backbone pass (the adapted model runs its own merged ViT, not forward_intermediates)
    side = [len(imgs) for m, imgs in requests[1:] if m != "model_lora"]
    assert gate.calls == [len(requests[0][1]), sum(side)]
    assert len(gate.calls) < len(requests)


def test_max_batch_is_respected(trained: Settings, images: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    predictor = Predictor(trained)
    batcher = Batcher(predictor, max_batch=4, max_wait_s=0.0)
    gate = Gate(predictor, "model_losa3", monkeypatch)
    sizes = [1, 2, 1, 3, 2, 1, 1, 2, 6, 1]  # 6 > max_batch: that request runs alone, unsplit
    requests = [("model_losa3", images[:n]) for n in sizes]
    results = send_together(batcher, gate, requests)
    batcher.close()
    assert [len(r) for r in results] == sizes
    assert sum(gate.calls) == sum(sizes)
    assert 6 in gate.calls and all(n <= 4 for n in gate.calls if n != 6)
    assert len(gate.calls) < len(requests)


def test_bad_input_fails_only_its_request(
    trained: Settings, images: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor = Predictor(trained)
    batcher = Batcher(predictor, max_batch=64, max_wait_s=0.0)
    gate = Gate(predictor, "model_losa_all", monkeypatch)
    requests = [
        ("model_losa_all", images[:1]),
        ("model_losa_all", images[1:3]),
        ("model_losa_all", [images[3], b"not an image"]),
        ("model_missing", images[:1]),
        ("model_linear", images[4:5]),
    ]
    results = send_together(batcher, gate, requests)
    batcher.close()
    assert isinstance(results[2], DatasetError) and "instance 1: uploaded image" in str(results[2])
    # raised while loading, before the request joins a batch (Predictor.predict raises the same)
    assert isinstance(results[3], FileNotFoundError)
    reference = Predictor(trained)
    for i in (0, 1, 4):
        assert_same(results[i], reference.predict(*requests[i]))
    assert gate.calls == [1, 3]


def test_a_lone_request_does_not_wait(trained: Settings, images: list[bytes]) -> None:
    # max_wait far beyond the test's patience: a request that finds the batcher idle must run at once, and so must
    # the next one from the same client (the batch before held one request: no load, no waiting)
    batcher = Batcher(Predictor(trained), max_batch=32, max_wait_s=600.0)
    for _ in range(2):
        done = threading.Event()

        def send(done: threading.Event = done) -> None:
            batcher.predict("model_losa3", images[:1])
            done.set()

        threading.Thread(target=send, daemon=True).start()
        assert done.wait(60)
    batcher.close()


def test_the_inference_service_predicts_through_the_batcher(trained: Settings, images: list[bytes]) -> None:
    import base64

    from api.inference import create_inference_app

    settings = trained.model_copy(update={"predict_max_batch": 8})
    JobStore.from_url(settings.broker_url).register_model(
        {
            "id": "model_losa3",
            "object": "model",
            "created_at": now(),
            "job_id": "job_x",
            "owner": None,
            "name": None,
            "method": "losa",
            "mode": "cache",
            "backbone": "test_vit",
            "classes": [str(i) for i in range(10)],
            "metrics": {},
        }
    )
    app = create_inference_app(settings)

    def body(imgs: list[bytes]) -> dict:
        return {"instances": [{"image_b64": base64.b64encode(b).decode()} for b in imgs]}

    with TestClient(app) as client:  # runs the lifespan: Predictor and Batcher up, then the batcher stopped
        r = client.post("/v1/models/model_losa3:predict", json=body(images[:2]))
        assert r.status_code == 200, r.text
        assert_same(r.json()["predictions"], Predictor(trained).predict("model_losa3", images[:2]))
        assert app.state.batcher.max_batch == 8 and app.state.batcher.predictor is app.state.predictor
        r = client.post("/v1/models/model_losa3:predict", json=body([images[0], b"\x89PNG broken"]))
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image"
        assert "instance 1" in r.json()["error"]["message"]
        batcher = app.state.batcher
    assert batcher._closed and (batcher._thread is None or not batcher._thread.is_alive())


def test_a_request_whose_caller_went_away_is_dropped(
    trained: Settings, images: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor = Predictor(trained)
    batcher = Batcher(predictor, max_batch=64, max_wait_s=0.0)
    gate = Gate(predictor, "model_losa3", monkeypatch)
    model = predictor.load("model_losa3")
    decoded = predictor.decode_for(model, images[:2])
    first = batcher.submit(model, decoded[:1])
    wait_for(lambda: len(gate.calls) == 1)
    gone = batcher.submit(model, decoded)  # queued behind the first batch, then its caller is cancelled
    assert gone.cancel()
    gate.open()
    assert first.result(60).shape == (1, 10)
    assert batcher.submit(model, decoded[1:]).result(60).shape == (1, 10)  # the batcher lives on
    assert gate.calls == [1, 1]  # the cancelled request's 2 images never ran
    batcher.close()
