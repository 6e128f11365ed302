"""Errors over real HTTP: a typed error gets its code and status from services/errors.py, anything else a 500
`internal_error` with a reference id (its traceback logged under it, nothing of its internals in the body) on a
connection that stays open; query integers out of range are 422; with Redis gone the API answers 503 with
Retry-After within about a second (not after the workers' 30 s of retries), /metrics says so, and nothing hangs."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from api.main import create_app
from services.data.datasets import DatasetError
from services.spec import SpecError
from storage.settings import Settings
from tests.helpers import serve
from worker.launcher import free_port


def _boom() -> None:
    raise RuntimeError("secret internals: /etc/passwd at 0xdeadbeef")


def _typed(kind: str) -> None:
    raise {"spec": SpecError("training.lr: must be finite"), "dataset": DatasetError("x.csv line 3: empty")}[kind]


@pytest.fixture
def app(tmp_path, redis_url):
    app = create_app(Settings(data_dir=tmp_path, redis_url=redis_url))
    app.add_api_route("/boom", _boom)
    app.add_api_route("/typed/{kind}", _typed)
    return app


def test_an_internal_error_is_a_500_with_a_reference_and_the_connection_stays_open(app, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="sidetune.api")
    with serve(app) as url:
        u = urlparse(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        conn.request("GET", "/boom")
        r = conn.getresponse()
        body = json.loads(r.read())
        sock = conn.sock
        assert r.status == 500 and body["error"]["code"] == "internal_error", body
        assert "secret" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
        ref = body["error"]["message"].split("reference ")[1].split(")")[0]
        assert any(ref in rec.getMessage() and rec.exc_info for rec in caplog.records)  # the traceback, under the ref
        assert (r.getheader("connection") or "").lower() != "close"
        conn.request("GET", "/healthz")  # the same connection serves the next request
        again = conn.getresponse()
        assert again.status == 200 and conn.sock is sock
        again.read()
        conn.close()


def test_typed_errors_map_to_their_codes(app) -> None:
    with serve(app) as url:
        r = httpx.get(f"{url}/typed/spec")
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_spec")
        assert r.json()["error"]["message"] == "training.lr: must be finite"
        r = httpx.get(f"{url}/typed/dataset")
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_dataset")


@pytest.mark.parametrize("after", [2**63 - 2, 2**63, 2**64, -1])
def test_event_cursors_out_of_range_are_422(app, after) -> None:
    with serve(app) as url:
        r = httpx.get(f"{url}/jobs/job_x/events", params={"after": after})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text


def test_a_body_with_thousands_of_bad_values_gets_a_short_422(app) -> None:
    body = {
        "dataset": {"path": "/x"},
        "backbone": {"name": "test_vit"},
        "method": {"name": "losa"},
        "sweep": {"lr": [100.0 + i for i in range(10_000)]},
    }
    with serve(app) as url:
        r = httpx.post(f"{url}/jobs", json=body, params={"dry_run": "true"}, timeout=30)
    message = r.json()["error"]["message"]
    assert r.status_code == 422 and message.startswith("sweep.lr.0: Input should be less than or equal to 10")
    assert message.endswith("; and 9980 more") and len(r.content) < 3000


def test_with_redis_gone_the_api_answers_503_within_a_second(tmp_path) -> None:
    app = create_app(Settings(data_dir=tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    with serve(app) as url:
        for path in ("/jobs", "/jobs/job_x", "/jobs/job_x/events", "/models", "/datasets"):
            t0 = time.monotonic()
            r = httpx.get(f"{url}{path}", timeout=30)
            assert time.monotonic() - t0 < 1.5, (path, time.monotonic() - t0)
            assert r.status_code == 503 and r.headers["retry-after"], (path, r.text)
            assert r.json()["error"]["code"] == "store_unavailable"
        t0 = time.monotonic()
        r = httpx.get(f"{url}/metrics", timeout=30)
        assert r.status_code == 200 and "sidetune_redis_up 0.0" in r.text and time.monotonic() - t0 < 3
        r = httpx.get(f"{url}/readyz", timeout=30)
        assert r.status_code == 503 and r.json()["redis"] is False


def test_an_inference_service_that_dies_mid_request_is_a_503(tmp_path, redis_url) -> None:
    """A soak killed the inference service under load: the API's forwarded request met a reset connection
    (httpx.ReadError), which was a 500."""
    listener = socket.create_server(("127.0.0.1", 0))

    def reset_each_connection() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            conn.recv(65536)  # the request arrived; the process dies before it answers (RST, as after SIGKILL)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    threading.Thread(target=reset_each_connection, daemon=True).start()
    inference = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with serve(create_app(Settings(data_dir=tmp_path, redis_url=redis_url, inference_url=inference))) as url:
            for path, body in (
                ("/v1/models/model_x:predict", {"instances": [{"image_b64": "AAAA"}]}),
                ("/v2/models/model_x/infer", {"inputs": []}),
            ):
                r = httpx.post(url + path, json=body, timeout=30)
                assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
                assert "unreachable (ReadError)" in r.text, r.text
    finally:
        listener.close()
