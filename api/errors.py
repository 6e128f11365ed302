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
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def _field(loc: tuple) -> str:
    # Drop the request part ("body"/"query") and pydantic's union tags ("losa" in method.losa.rank).
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("body", "query", "path", "header") else list(map(str, loc))
    if len(parts) >= 2 and parts[0] == "method":
        parts = [parts[0], *parts[2:]]
    return ".".join(parts) or "request"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{_field(tuple(e['loc']))}: {e['msg']}" for e in exc.errors()]
        return JSONResponse(error_body("invalid_request", "; ".join(problems)), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "request_too_large"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        # The job store retried for about 30 s: Redis is down or restarting, nothing was lost; a retry may succeed.
        log.warning("redis unavailable on %s %s: %s", request.method, request.url.path, exc)
        message = "the job store (Redis) is unavailable; retry shortly"
        return JSONResponse(error_body("store_unavailable", message), status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(StoreUnavailable)
    async def _storage_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        log.warning("store unavailable on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(error_body("storage_unavailable", f"{exc}; retry shortly"), status_code=503,
                            headers={"Retry-After": "5"})  # fmt: skip

    @app.exception_handler(Incomplete)
    async def _incomplete(request: Request, exc: Incomplete) -> JSONResponse:
        # Written last, the marker is missing only while a writer is at work or after one was cut off: retry later.
        return JSONResponse(error_body("store_incomplete", str(exc)), status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", f"{type(exc).__name__}: {exc}"), status_code=500)
