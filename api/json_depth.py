"""JSON nesting limit: a request body whose arrays and objects nest deeper than `MAX_DEPTH` is refused (422
`json_too_deep`, 400 on `/v2` paths) before any parser sees it. Python's json module and FastAPI's body parsing
recurse once per level: 100,000 `[` raise RecursionError, which no route expects.

`DepthLimit` is pure ASGI, like the body size limit (api/limits.py): it counts the depth of each chunk of the body as
it arrives, so a route, which reads the whole body before parsing it, never parses one that is too deep. Brackets
inside strings do not count, and a quote escaped by an odd run of backslashes does not end its string. A body with no
more brackets than the limit, as predict bodies are, is only counted with bytes.count; others are scanned in C and
numpy, never a Python loop per byte: on 32 MB, about 25 ms for base64 images and 200 ms for a `pixels` tensor
as nested lists, less than json.loads of the same body (bench/json_depth.py). What is not JSON is left alone:
multipart and form bodies (files hold any bytes), dataset uploads (archives), and the binary tensors that follow the
JSON header of an Open Inference Protocol request. A body that is not valid JSON may be miscounted after its first
fault, where its parser stops anyway.
"""

from __future__ import annotations

import numpy as np
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response, is_v2

MAX_DEPTH = 64  # a job spec nests 4 levels, a v2 `pixels` tensor in nested lists 7
EXEMPT_PREFIXES = ("/datasets",)  # uploads stream archives to disk; no JSON is parsed there
FORMS = (b"multipart/", b"application/x-www-form-urlencoded")
_QUOTE, _OPEN, _CLOSE = ord('"'), ord("{"), ord("}")


def message(limit: int) -> str:
    return f"the JSON body nests arrays and objects deeper than {limit} levels; at most {limit} are accepted"


class TooDeep(HTTPException):
    """An HTTPException, so FastAPI's body parsing passes it on (other errors there become a vague 400); the app's
    handler answers it with `code`."""

    code = "json_too_deep"


class DepthScanner:
    """The nesting depth of a JSON text fed in chunks; `feed` returns False once it went deeper than `limit`.

    While the brackets fed so far, in strings or not, number at most `limit`, no depth can pass it: the chunks are
    only counted (bytes.count, a few microseconds for a predict body, where numpy's calls cost a hundred) and kept,
    as references to the bytes the route reads anyway. Past that, they are scanned exactly: escaped backslashes and
    escaped quotes are removed first (bytes.replace, left to right, as a parser reads them; a run of backslashes at
    the end of a chunk waits for the next one), then numpy keeps the quotes and brackets, and of those counts a
    bracket when an even number of quotes came before it. `release()` drops the kept chunks once the body is whole."""

    def __init__(self, limit: int = MAX_DEPTH) -> None:
        self.limit = limit
        self.depth = 0
        self._deepest = 0
        self.in_string = False
        self.held = b""  # a run of backslashes that ended the last chunk
        self.opens = 0  # brackets fed while counting only
        self.kept: list[bytes] | None = []  # the chunks fed while counting only; None once scanning

    @property
    def deepest(self) -> int:
        """The deepest nesting of what was fed (scanning the kept chunks first)."""
        self._scan_kept()
        return self._deepest

    def feed(self, data: bytes) -> bool:
        if self.kept is not None:
            self.opens += data.count(b"[") + data.count(b"{")
            self.kept.append(data)
            if self.opens <= self.limit:
                return True
            self._scan_kept()
            return self._deepest <= self.limit
        self._scan(data)
        return self._deepest <= self.limit

    def release(self) -> None:
        """The body is whole and within the limit: forget the kept chunks (`deepest` is no longer computed)."""
        if self.kept is not None:
            self.kept = []

    def _scan_kept(self) -> None:
        if self.kept is not None:
            kept, self.kept = self.kept, None
            for chunk in kept:
                self._scan(chunk)

    def _scan(self, data: bytes) -> None:
        data = self.held + data
        kept = data.rstrip(b"\\")
        self.held = data[len(kept) :]
        if b"\\" in kept:
            kept = kept.replace(b"\\\\", b"").replace(b'\\"', b"")
        a = np.frombuffer(kept, np.uint8)
        folded = a | 0x20  # `[` and `]` become `{` and `}`
        marks = a[(a == _QUOTE) | (folded == _OPEN) | (folded == _CLOSE)]
        if marks.size:
            self._count(marks)

    def _count(self, a: np.ndarray) -> None:
        quotes = a == _QUOTE
        seen = np.cumsum(quotes, dtype=np.int64)
        outside = ~quotes & ((seen + self.in_string) & 1 == 0)
        steps = np.where(a[outside] | 0x20 == _CLOSE, -1, 1)
        if steps.size:
            depths = np.cumsum(steps, dtype=np.int64)
            self._deepest = max(self._deepest, self.depth + int(depths.max()))
            self.depth += int(depths[-1])
        self.in_string ^= bool(seen[-1] & 1)


class DepthLimit:
    """Refuses a JSON body nested deeper than `max_depth` as it streams in (see the module's docstring)."""

    def __init__(self, app: ASGIApp, max_depth: int = MAX_DEPTH) -> None:
        self.app, self.max_depth = app, max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path.startswith(EXEMPT_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        left: int | None = None  # bytes still to count; None: the whole body
        if is_v2(path):  # the protocol's body is JSON whatever its content type, binary tensors after the header
            header = headers.get(b"inference-header-content-length", b"")
            left = int(header) if header.isdigit() and len(header) <= 18 else None
        elif headers.get(b"content-type", b"").lower().startswith(FORMS):
            await self.app(scope, receive, send)
            return
        scanner = DepthScanner(self.max_depth)
        started = False

        async def counting_receive() -> Message:
            nonlocal left
            msg = await receive()
            if msg["type"] == "http.request" and left != 0:
                chunk = msg.get("body", b"")
                if left is not None:
                    chunk, left = chunk[:left], max(0, left - len(chunk))
                if not scanner.feed(chunk):
                    raise TooDeep(422, message(self.max_depth))
                if not msg.get("more_body", False) or left == 0:
                    scanner.release()
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except TooDeep:
            if started:
                raise
            response = error_response(path, 422, TooDeep.code, message(self.max_depth))
            await response(scope, receive, send)
