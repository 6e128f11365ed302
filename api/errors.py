"""Every error leaves the API as `{"error": {"code": ..., "message": ...}}`: typed errors with the status and code that
services/errors.py gives them (a 4xx naming the cause; 503 with Retry-After `store_unavailable` while Redis is down,
`store_refuses_writes` while it answers but refuses writes (MISCONF, OOM), `storage_unavailable` while the store of
models and datasets is unreachable, `store_incomplete` for a model or dataset that is not whole on it; 507
`disk_full` naming the directory), anything else 500 `internal_error` with a reference id whose traceback is logged."""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.errors import KNOWN, UserError, classify, internal_message, reference
from storage.archives import ArchiveError
from storage.faults import as_disk_full, refusal_text

log = logging.getLogger("sidetune.api")


MAX_PROBLEMS = 20  # validation problems a 422 lists
BODY_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's 400 when json.loads raised on a body


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def is_v2(path: str) -> bool:
    """Open Inference Protocol v2 routes answer errors in that protocol's shape."""
    return path == "/v2" or path.startswith("/v2/")


def error_response(
    path: str, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
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


def _short(exc: Exception, limit: int = 200) -> str:
    text = str(exc).split("; use sys.set_int_max_str_digits")[0]  # Python's advice is for the server, not the client
    return text if len(text) <= limit else text[:limit] + "..."


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request.url.path, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        problems = [f"{_field(tuple(e['loc']))}: {e['msg']}" for e in errors[:MAX_PROBLEMS]]
        if len(errors) > MAX_PROBLEMS:  # a list of 100,000 bad values would answer megabytes
            problems.append(f"and {len(errors) - MAX_PROBLEMS} more")
        return error_response(request.url.path, 422, "invalid_request", "; ".join(problems))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or {
            404: "not_found",
            405: "method_not_allowed",
            401: "unauthorized",
            413: "request_too_large",
        }.get(exc.status_code, "http_error")
        status, message = exc.status_code, str(exc.detail)
        if message == BODY_PARSE_ERROR and isinstance(exc.__cause__, ValueError):
            # json.loads refused the body (an integer of more than 4,300 digits, bytes that are not UTF-8): say why,
            # with the status and code of other invalid JSON
            status, code, message = 422, "invalid_request", f"the body is not valid JSON: {_short(exc.__cause__)}"
        return error_response(request.url.path, status, code, message, exc.headers)

    async def _known(request: Request, exc: Exception) -> JSONResponse:
        exc = as_disk_full(exc) or exc  # an OSError(ENOSPC) no caller named (store errors come named already)
        known = classify(exc)
        if known is None:  # a Redis error or an OSError that is no fault we know: ours
            ref = reference()
            log.error("internal error %s on %s %s", ref, request.method, request.url.path, exc_info=exc)
            return error_response(request.url.path, 500, "internal_error", internal_message(ref))
        status, code = known
        message = str(exc)
        if code == "store_unavailable":
            message = "the job store (Redis) is unavailable; retry shortly"
        elif code == "store_refuses_writes":
            message = f"the job store (Redis) refuses writes ({refusal_text(exc)}); retry shortly"
        elif code == "storage_unavailable":
            message = f"{exc}; retry shortly"
        if status >= 500:
            log.warning("%s on %s %s: %s", code, request.method, request.url.path, exc)
        # Redis, the store, or a model being written: nothing was lost, and a retry may succeed; a key's jobs quota
        # frees up as its jobs end.
        headers = {"Retry-After": "5"} if status == 503 else None
        if getattr(exc, "retry_after_s", None):
            headers = {"Retry-After": str(exc.retry_after_s)}
        return error_response(request.url.path, status, code, message, headers)

    # every type services/errors.py maps, and those it recognises by their content: Redis refusing writes (a
    # ResponseError), a full disk (an OSError)
    for known in (UserError, ArchiveError, *KNOWN, redis.ResponseError, OSError):
        app.add_exception_handler(known, _known)
    app.add_middleware(CatchAll)


class CatchAll:
    """Anything no handler knows is our fault: 500 `internal_error` with a reference id, under which the traceback is
    logged, and nothing of its internals in the body (a client that went away mid-request is no error of ours: one
    info line). Pure ASGI and inside the app's middleware, so the exception stops here: Starlette's outermost error
    middleware would answer too, but then re-raise it to the server, which drops the connection (the client's next
    request on it would fail)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:  # the client left before its body was read (e.g. the API refused a forwarded one)
            log.info("client disconnected during %s %s; nothing to answer", scope.get("method"), scope.get("path"))
        except Exception:
            ref = reference()
            log.exception("internal error %s on %s %s", ref, scope.get("method"), scope.get("path"))
            if started:  # part of the answer is out: nothing sensible can follow it
                raise
            response = error_response(scope["path"], 500, "internal_error", internal_message(ref))
            await response(scope, receive, send)
