"""Predict and export through the API: `/v1/models/{id}:predict`, `:predict-files`, `/v1/predict`, `/v2/...` and
`/models/{id}/export` are forwarded to the inference service (`settings.inference_location`), streaming both ways,
so one public URL keeps serving every client (the
CLI, the demo, scripts written against the API) while the inference service runs where the GPU is. The inference
service checks the API key and the model's owner itself; the API passes the request on as it came (the
Authorization header included) and the answer back as it left, status and headers included. The API's OpenAPI
document shows these operations as the inference service documents them (api/main.py).

An inference service that cannot be reached, or that goes away mid-request (killed, restarting: the connection reset),
is 503 `inference_unavailable` with Retry-After; one that does not answer within the timeouts 504 `inference_timeout`.
"""

from __future__ import annotations

import asyncio
import weakref
from urllib.parse import quote

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from api.errors import ApiError

router = APIRouter()

# Per-connection headers (RFC 9110 sec. 7.6.1) and the Host of this hop are not forwarded.
HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
}
TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=600.0, pool=600.0)  # a cold load of a large model takes a while

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()


def _client(app: FastAPI) -> httpx.AsyncClient:
    """One pooled client per event loop (uvicorn runs one; a test client may run several)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None or client.is_closed:  # closed by an app's shutdown: another app may still run on this loop
        base = app.state.settings.inference_location
        client = _clients[loop] = httpx.AsyncClient(
            base_url=base, timeout=TIMEOUT, limits=httpx.Limits(max_connections=256, max_keepalive_connections=64)
        )
    return client


async def close_clients() -> None:
    for loop, client in list(_clients.items()):
        await client.aclose()
        _clients.pop(loop, None)


async def forward(request: Request) -> StreamingResponse:
    client = _client(request.app)
    # As bytes: a header value need not be ASCII (latin-1 on the wire), which httpx would refuse to encode as str
    headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in HOP]
    # The path as it came, still percent-encoded: the decoded one may hold characters a URL cannot.
    path = request.scope.get("raw_path", b"").decode("latin-1") or quote(request.url.path)
    try:
        outgoing = client.build_request(
            request.method, path, params=request.url.query or None, headers=headers, content=request.stream()
        )
    except httpx.InvalidURL as e:
        raise ApiError(400, "invalid_request", f"the request's URL cannot be forwarded: {e}") from None
    try:
        answer = await client.send(outgoing, stream=True)
    except (httpx.NetworkError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as e:  # down, or died mid-request
        raise ApiError(
            503,
            "inference_unavailable",
            f"the inference service at {client.base_url} is unreachable ({type(e).__name__}); retry shortly",
            {"Retry-After": "5"},
        ) from None
    except httpx.TimeoutException as e:
        raise ApiError(
            504,
            "inference_timeout",
            f"the inference service at {client.base_url} did not answer in time ({type(e).__name__}); retry shortly",
            {"Retry-After": "5"},
        ) from None
    back = {k: v for k, v in answer.headers.items() if k.lower() not in HOP}
    return StreamingResponse(
        answer.aiter_raw(), status_code=answer.status_code, headers=back, background=BackgroundTask(answer.aclose)
    )


for path in (
    "/v1/models/{model_id}:predict",
    "/v1/models/{model_id}:predict-files",
    "/v1/predict",
    "/v2/models/{model_id}/infer",
):
    router.add_api_route(path, forward, methods=["POST"], include_in_schema=False)
for path in ("/v2", "/v2/{rest:path}", "/models/{model_id}/export"):
    router.add_api_route(path, forward, methods=["GET"], include_in_schema=False)
