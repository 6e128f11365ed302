"""Every error leaves the API as `{"error": {"code": ..., "message": ...}}` with a 4xx status naming the cause
(503 `store_unavailable` while Redis is down, `storage_unavailable` while the store of models and datasets is, and
`store_incomplete` for a model or dataset that is not whole on it)."""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from storage.store import Incomplete, StoreUnavailable

log = logging.getLogger("sidetune.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def is_v2(path: str) -> bool:
    """Open Inference Protocol v2 routes answer errors in that protocol's shape."""
    return path == "/v2" or path.startswith("/v2/")


def error_response(path: str, status: int, code: str, message: str, headers: dict[str, str] | None = None
                   ) -> JSONResponse:  # fmt: skip
    """`{"error": {"code", "message"}}`; on `/v2` paths the protocol's `{"error": "<message>"}`, and 400 for a
    request the protocol calls bad (our 422)."""
    if is_v2(path):
        return JSONResponse({"error": message}, status_code=400 if status == 422 else status, headers=headers)
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def _field(loc: tuple) -> str:
    # Drop the request part ("body"/"query") and pydantic's union tags ("losa" in method.losa.rank).
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("body", "query", "path", "header") else list(map(str, loc))
    if len(parts) >= 2 and parts[0] == "method":
        parts = [parts[0], *parts[2:]]
    return ".".join(parts) or "request"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request.url.path, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{_field(tuple(e['loc']))}: {e['msg']}" for e in exc.errors()]
        return error_response(request.url.path, 422, "invalid_request", "; ".join(problems))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "request_too_large"}.get(
            exc.status_code, "http_error"
        )
        return error_response(request.url.path, exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        # The job store retried for about 30 s: Redis is down or restarting, nothing was lost; a retry may succeed.
        log.warning("redis unavailable on %s %s: %s", request.method, request.url.path, exc)
        message = "the job store (Redis) is unavailable; retry shortly"
        return error_response(request.url.path, 503, "store_unavailable", message, {"Retry-After": "5"})

    @app.exception_handler(StoreUnavailable)
    async def _storage_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        log.warning("store unavailable on %s %s: %s", request.method, request.url.path, exc)
        return error_response(request.url.path, 503, "storage_unavailable", f"{exc}; retry shortly",
                              {"Retry-After": "5"})  # fmt: skip

    @app.exception_handler(Incomplete)
    async def _incomplete(request: Request, exc: Incomplete) -> JSONResponse:
        # Written last, the marker is missing only while a writer is at work or after one was cut off: retry later.
        return error_response(request.url.path, 503, "store_incomplete", str(exc), {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request.url.path, 500, "internal_error", f"{type(exc).__name__}: {exc}")
