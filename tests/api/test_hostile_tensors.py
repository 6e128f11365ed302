"""The third hostile trial's predict inputs, over real HTTP against the inference service and through the API's
forwarding (a real Redis holds the model's record): shapes whose product overflows int64, values numpy cannot hold,
booleans where the protocol wants integers, bodies nested 100,000 deep, in JSON and in the binary tensor extension, on
v2 and their v1 equivalents; and the other 5xx found by trying hostile values on every route. Each is a 4xx naming
the input (400 on v2; 422 elsewhere, the API's convention). The figures are printed (`pytest -s`)."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import struct
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from api.inference import create_inference_app
from api.main import create_app
from api.oip import ProtocolError, parse_request
from storage.redis import JobStore, now
from storage.settings import Settings
from tests.helpers import serve
from worker.launcher import free_port

MODEL = "model_hostile_tensors"
INFER = f"/v2/models/{MODEL}/infer"
PREDICT = f"/v1/models/{MODEL}:predict"
DEEP = b"[" * 100_000 + b"]" * 100_000
FIGURES = {"tried": 0, "4xx": 0, "5xx": 0}


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> dict[str, str]:
    """The inference service and the API (forwarding to it) under uvicorn, sharing a Redis where the model is
    registered; every request here is refused before its weights would be loaded."""
    root = tmp_path_factory.mktemp("hostile_tensors")
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    port = free_port()
    settings = Settings(data_dir=root, redis_url=redis_url, allowed_roots=[root], inference_port=port, device="cpu")
    JobStore.from_url(redis_url).register_model(
        {
            "id": MODEL,
            "object": "model",
            "created_at": now(),
            "job_id": "job_hostile_tensors",
            "owner": None,
            "name": None,
            "method": "linear",
            "mode": "cache",
            "backbone": "test_vit",
            "classes": ["a", "b"],
            "metrics": {},
        }
    )
    with serve(create_inference_app(settings)) as inference:
        settings = settings.model_copy(update={"inference_url": inference})
        with serve(create_app(settings)) as api:
            yield {"inference": inference, "api": api, "root": str(root)}


def _png() -> str:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _tensor(name: str, datatype: str, shape: list, data: object = None) -> dict:
    tensor = {"name": name, "datatype": datatype, "shape": shape}
    return {"inputs": [tensor if data is None else {**tensor, "data": data}]}


def _binary(name: str, datatype: str, shape: list, blob: bytes, head: bytes | None = None) -> dict:
    """The binary tensor extension: the JSON header, then `blob`, its length in Inference-Header-Content-Length."""
    if head is None:
        tensor = {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(blob)}}
        head = json.dumps({"inputs": [tensor]}).encode()
    return {
        "content": head + blob,
        "headers": {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
    }


def _raw(text: bytes) -> dict:
    return {"content": text, "headers": {"Content-Type": "application/json"}}


PNG = _png()
ELEMENT = struct.pack("<I", 3) + b"abc"
# (id, path, request, status, what the message must name); each is sent to the inference service and to the API
PREDICTS = [
    (
        "json shape 2^32 x 2^32",
        INFER,
        {"json": _tensor("pixels", "UINT8", [1, 2**32, 2**32, 3], [0])},
        400,
        "input 'pixels': shape [1, 4294967296, 4294967296, 3] says 55340232221128654848 values",
    ),
    (
        "json shape 2^32 x 2^32, no data",
        INFER,
        {"json": _tensor("pixels", "UINT8", [1, 2**32, 2**32, 3], [])},
        400,
        "input 'pixels': shape [1, 4294967296, 4294967296, 3]",
    ),
    (
        "json shape 2^62 x 4",
        INFER,
        {"json": _tensor("pixels", "UINT8", [1, 2**62, 4, 3], [])},
        400,
        "input 'pixels': shape [1, 4611686018427387904, 4, 3]",
    ),
    (
        "binary shape 2^32 x 2^32",
        INFER,
        _binary("pixels", "UINT8", [1, 2**32, 2**32, 3], b""),
        400,
        "input 'pixels': shape [1, 4294967296, 4294967296, 3] needs 55340232221128654848 bytes, got 0",
    ),
    (
        "binary shape 2^62 x 4",
        INFER,
        _binary("pixels", "UINT8", [1, 2**62, 4, 3], b"\0" * 12),
        400,
        "input 'pixels': shape [1, 4611686018427387904, 4, 3] needs 55340232221128654848 bytes, got 12",
    ),
    (
        "json pixel 1e30",
        INFER,
        {"json": _tensor("pixels", "UINT8", [1, 1, 1, 3], [1e30, 0, 0])},
        400,
        "input 'pixels': value 0 is 1e+30, a number with a fraction or an exponent",
    ),
    (
        "json pixel 2^64",
        INFER,
        {"json": _tensor("pixels", "UINT8", [1, 1, 1, 3], [0, 0, 2**64])},
        400,
        "input 'pixels': value 2 is 18446744073709551616; expected an integer in 0..255",
    ),
    (
        "json pixel NaN",
        INFER,
        _raw(b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [0, NaN, 0]}]}'),
        400,
        "input 'pixels': value 1 is nan, not a finite",
    ),
    (
        "json pixel true",
        INFER,
        {"json": _tensor("pixels", "UINT8", [1, 1, 1, 3], [[[[0, True, 0]]]])},
        400,
        "input 'pixels': value 1 is the boolean true",
    ),
    (
        "json pixel string",
        INFER,
        {"json": _tensor("pixels", "UINT8", [1, 1, 1, 3], ["7", 0, 0])},
        400,
        "input 'pixels': value 0 is the string '7'",
    ),
    ("json 100,000 nested [", INFER, _raw(DEEP), 400, "nests arrays and objects deeper than 64 levels"),
    (
        "binary header 100,000 nested [",
        INFER,
        _binary("image", "BYTES", [1], ELEMENT, head=DEEP),
        400,
        "deeper than 64 levels",
    ),
    (
        "json shape [true]",
        INFER,
        {"json": _tensor("image", "BYTES", [True], [PNG])},
        400,
        "input 'image': shape must be a list of 1 to 4 non-negative integers (not booleans), got [True]",
    ),
    (
        "binary shape [true]",
        INFER,
        _binary("image", "BYTES", [True], ELEMENT),
        400,
        "input 'image': shape must be a list of 1 to 4 non-negative integers (not booleans), got [True]",
    ),
    (
        "binary_data_size true",
        INFER,
        _binary(
            "image",
            "BYTES",
            [1],
            ELEMENT,
            head=json.dumps(
                {
                    "inputs": [
                        {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": True}}
                    ]
                }
            ).encode(),
        ),
        400,
        "input 'image': binary_data_size True does not fit the body",
    ),
    (
        "header length '²'",
        INFER,
        {"content": b"{}", "headers": {"Inference-Header-Content-Length": b"\xb2"}},
        400,
        "Inference-Header-Content-Length '²' does not fit the body",
    ),
    (
        "header length of 5,000 digits",
        INFER,
        {"content": b"{}", "headers": {"Inference-Header-Content-Length": "9" * 5000}},
        400,
        "Inference-Header-Content-Length '9999",
    ),
    (
        "integer literal of 5,000 digits",
        INFER,
        _raw(b'{"id": ' + b"9" * 5000 + b"}"),
        400,
        "the request is not valid JSON: Exceeds the limit (4300 digits)",
    ),
    (
        "parameters 5",
        INFER,
        {"json": {**_tensor("image", "BYTES", [1], [PNG]), "parameters": 5}},
        400,
        "`parameters` must be an object, got 5",
    ),
    (
        "output parameters 5",
        INFER,
        {"json": {**_tensor("image", "BYTES", [1], [PNG]), "outputs": [{"name": "label", "parameters": 5}]}},
        400,
        "output 'label': `parameters` must be an object",
    ),
    ("input name a list", INFER, {"json": _tensor(["image"], "BYTES", [1], [PNG])}, 400, "unknown input ['image']"),
    ("v1 100,000 nested [", PREDICT, _raw(DEEP), 422, "nests arrays and objects deeper than 64 levels"),
    ("v1 threshold 1e30", PREDICT, {"json": {"instances": [{"image_b64": PNG}], "threshold": 1e30}}, 422, "threshold"),
    ("v1 threshold true", PREDICT, {"json": {"instances": [{"image_b64": PNG}], "threshold": True}}, 422, "threshold"),
    (
        "v1 threshold Infinity",
        PREDICT,
        _raw(b'{"instances": [{"image_b64": "' + PNG.encode() + b'"}], "threshold": Infinity}'),
        422,
        "threshold: Input should be a finite number",
    ),
    (
        "v1 integer literal of 5,000 digits",
        PREDICT,
        _raw(b'{"instances": [], "threshold": ' + b"9" * 5000 + b"}"),
        422,
        "the body is not valid JSON: Exceeds the limit (4300 digits)",
    ),
]


@pytest.mark.parametrize("via", ["inference", "api"])
@pytest.mark.parametrize(("what", "path", "request_", "status", "named"), PREDICTS, ids=[p[0] for p in PREDICTS])
def test_a_hostile_predict_is_a_4xx_naming_the_input(urls, via, what, path, request_, status, named) -> None:
    r = httpx.post(urls[via] + path, timeout=60, **request_)
    _check(r, status, named, path)


def _spec(path: str) -> dict:
    return {
        "dataset": {"path": path},
        "backbone": {"name": "test_vit", "pretrained": False},
        "method": {"name": "linear"},
    }


# (id, method, path, request, status, what the message must name); ROOT is the allowed root
ROOT = "<root>"
ROUTES = [
    ("job nested 100,000 deep", "POST", "/jobs", _raw(DEEP), 422, "deeper than 64 levels"),
    # no content type: FastAPI would not parse it as JSON, but the limit does not rely on that
    (
        "job objects nested 100,000 deep, no content type",
        "POST",
        "/jobs",
        {"content": b'{"a":' * 100_000 + b"1" + b"}" * 100_000},
        422,
        "deeper than 64 levels",
    ),
    (
        "job path with a name too long for the filesystem",
        "POST",
        "/jobs?dry_run=true",
        {"json": _spec(f"{ROOT}/{'a' * 300}")},
        422,
        f"dataset.path: '{ROOT}/aaaa",
    ),
    (
        "job path a loop of links",
        "POST",
        "/jobs?dry_run=true",
        {"json": _spec(f"{ROOT}/loop_a")},
        422,
        f"dataset.path: '{ROOT}/loop_a' cannot be read",
    ),
    (
        "job body not UTF-8",
        "POST",
        "/jobs",
        _raw(b'{"name": "\xff"}'),
        422,
        "the body is not valid JSON: 'utf-8' codec can't decode byte 0xff",
    ),
    ("plot name of 5,000 characters", "GET", f"/models/{MODEL}/plots/{'a' * 5000}.png", {}, 422, "name"),
]


@pytest.mark.parametrize(("what", "method", "path", "request_", "status", "named"), ROUTES, ids=[r[0] for r in ROUTES])
def test_a_hostile_job_or_route_is_a_4xx_naming_the_field(urls, what, method, path, request_, status, named) -> None:
    root = urls["root"]
    if "json" in request_:
        request_ = {"json": json.loads(json.dumps(request_["json"]).replace(ROOT, root))}
    r = httpx.request(method, urls["api"] + path, timeout=60, **request_)
    _check(r, status, named.replace(ROOT, root), path)


def test_a_client_gone_mid_body_is_no_internal_error(urls, caplog: pytest.LogCaptureFixture) -> None:
    """The API refusing a forwarded body (too deep) drops its stream to the inference service, which saw the client
    disconnect mid-body and logged an `internal error` with a traceback for it."""
    caplog.set_level(logging.INFO, logger="sidetune.api")
    host, port = urls["inference"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n[[[[".encode())
    deadline = time.monotonic() + 10
    while not any("client disconnected" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.05)
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"client disconnected during POST {INFER}" in m for m in messages), messages
    assert not any("internal error" in m for m in messages), messages


def _check(r: httpx.Response, status: int, named: str, path: str) -> None:
    FIGURES["tried"] += 1
    FIGURES["5xx"] += r.status_code >= 500
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    message = error if path.startswith("/v2") else error["message"]
    assert named in message, message
    FIGURES["4xx"] += 1


def test_pixels_as_flat_or_nested_lists_are_read_exactly() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    for data in (pixels.reshape(-1).tolist(), pixels.tolist(), pixels.reshape(2, -1).tolist()):
        body = json.dumps(_tensor("pixels", "UINT8", list(pixels.shape), data)).encode()
        np.testing.assert_array_equal(parse_request(body, None, 64, 10**6).images, pixels)
    body = json.dumps(_tensor("pixels", "UINT8", [2, 3, 4, 3], pixels.tolist())).encode()
    with pytest.raises(ProtocolError, match="holds 24 pixels; at most 23") as e:
        parse_request(body, None, 64, 23)
    assert (e.value.status, e.value.code) == (413, "too_many_pixels")


def test_figures() -> None:
    print(
        f"\nhostile tensors and routes: {FIGURES['tried']} tried, {FIGURES['4xx']} refused with a 4xx naming the "
        f"input, {FIGURES['5xx']} 5xx"
    )
    assert FIGURES["tried"] == 2 * len(PREDICTS) + len(ROUTES) and FIGURES["5xx"] == 0
