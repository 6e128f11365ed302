"""Request body size limit: a body over `max_request_mb` is refused with 413 `request_too_large` before the route
reads it into memory. Dataset uploads (`/datasets`) stream to disk and enforce their own, larger limit.

Pure ASGI rather than `BaseHTTPMiddleware`, so the body is counted as it streams in: a client that sends no
Content-Length (chunked) or lies about it is stopped at the limit too.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import is_v2

EXEMPT_PREFIXES = ("/datasets",)


class _TooLarge(HTTPException):
    """An HTTPException, so FastAPI's body parsing passes it on (other errors there become a 400) and the app's
    handler answers 413 `request_too_large`."""


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(EXEMPT_PREFIXES):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, scope["path"])
            return

        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(413, self._message())
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:  # the route was still reading its body: nothing has been answered yet
                await self._refuse(send, scope["path"])

    def _message(self) -> str:
        return f"the request body exceeds {self.max_bytes / 2**20:g} MB (SIDETUNE_MAX_REQUEST_MB)"

    async def _refuse(self, send: Send, path: str) -> None:
        error = self._message() if is_v2(path) else {"code": "request_too_large", "message": self._message()}
        body = json.dumps({"error": error}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
