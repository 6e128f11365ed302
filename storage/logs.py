"""Structured logs for every process: one JSON object per line (`ts`, `level`, `logger`, `message`, and the job's
`job_id`, `task` and `worker` while a step of a job runs), or plain text; and API keys scrubbed from every line.

It lives in storage/ (the bottom of the chain api -> worker -> services -> storage) so that every layer can tag
its lines. Lines go to stderr, which `sidetune serve` points at `<name>.log` under SIDETUNE_LOG_DIR (or leaves as its
own stderr); a line the log's disk refuses because it is full is kept and written once there is room again
(`KeepingHandler`), so the traceback behind a reference id outlives a full disk. The worker's task wrapper binds the
job with `log_context`; the API binds the request's ASGI scope (`bind_scope`), whose path parameters (`job_id`,
`model_id`) are read when a line is written, after routing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
from collections import deque
from collections.abc import Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from typing_extensions import TypedDict

CONTEXT_FIELDS = ("job_id", "task", "worker", "model_id")


class LogContext(TypedDict, total=False):
    """The fields a line is tagged with (CONTEXT_FIELDS): those bound, and the route's path parameters."""

    job_id: str
    task: str  # the step a worker runs: extract, extract_shard, train
    worker: str
    model_id: str


class LogLine(LogContext, total=False):
    """One JSON line (`JsonFormatter`): when, how severe, which logger, what; uvicorn's access lines add the request;
    a traceback or stack where the record has one."""

    ts: str
    level: str
    logger: str
    message: str
    method: str
    path: str
    status: int
    exc: str
    stack: str


_context: ContextVar[LogContext | None] = ContextVar("sidetune_log_context", default=None)
_scope: ContextVar[MutableMapping[str, Any] | None] = ContextVar("sidetune_log_scope", default=None)

# A credential after `Bearer`, `Authorization:` or `api_key=`: whatever a line carries, even a key this process
# does not know (a wrong one), is never written.
_CREDENTIAL = re.compile(
    r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?|\bbearer\s+|"
    r"\bapi[_-]?keys?[\"']?\s*[:=]\s*[\"']?)[^\s\"',;)\]}]+"
)
REDACTED = "[redacted]"


@contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Tag every line written in this block (and in threads started with a copy of its context)."""
    bound = {k: v for k, v in fields.items() if v is not None}
    token = _context.set(LogContext(**{**(_context.get() or {}), **bound}))  # an inner block's value wins
    try:
        yield
    finally:
        _context.reset(token)


def bind_scope(scope: MutableMapping[str, Any]) -> Any:
    """The API's middleware binds each request's scope; returns the token to reset it with."""
    return _scope.set(scope)


def reset_scope(token: Any) -> None:
    _scope.reset(token)


def current_context() -> LogContext:
    fields = LogContext(**(_context.get() or {}))
    scope = _scope.get()
    if scope is not None:  # path parameters exist once the router matched, so they are read per line
        params = scope.get("path_params") or {}
        fields.update({k: params[k] for k in ("job_id", "model_id") if k in params and k not in fields})
    return fields


class Redactor:
    """Replaces configured keys and anything that looks like a credential with `[redacted]`."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a key that contains another is replaced whole; also their JSON-escaped forms.
        forms = {f for s in secrets if s for f in (s, json.dumps(s)[1:-1])}
        self.secrets = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _CREDENTIAL.sub(lambda m: m.group(1) + REDACTED, text)


class JsonFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        out = LogLine(
            ts=datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            level=record.levelname.lower(),
            logger=record.name,
            message=record.getMessage(),
        )
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            # uvicorn's access line: (client, method, path with query, HTTP version, status)
            out.update(method=record.args[1], path=record.args[2], status=record.args[4])
        out.update(current_context())
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return self.redact(json.dumps(out, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = current_context()
        if context:
            line += " [" + " ".join(f"{k}={context[k]}" for k in CONTEXT_FIELDS if k in context) + "]"
        return self.redact(line)


class KeepingHandler(logging.StreamHandler):
    """Writes each line whole to the stream's file descriptor. A line the disk refuses (ENOSPC, EDQUOT: the log
    file's disk is full) is kept in memory, at most `keep_bytes` (beyond, the oldest kept lines are dropped and
    counted), and written before the next line once there is room again, followed by a count of any dropped; so
    the traceback behind a reference id, logged just as the disk filled up, is not lost."""

    def __init__(self, stream: TextIO, keep_bytes: int = 4 << 20) -> None:
        super().__init__(stream)
        self.keep_bytes = keep_bytes
        self._kept: deque[bytes] = deque()
        self._kept_bytes = 0
        self._dropped = 0
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # a stream without a descriptor (a test's capture)
            self._fd = None

    @property
    def kept_lines(self) -> int:
        return len(self._kept)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        if self._fd is None:
            super().emit(record)
            return
        self._keep(line.encode("utf-8", "replace"))
        try:
            self.stream.flush()  # what others wrote to the stream goes first
            self._drain()
        except Exception:
            self.handleError(record)

    def _keep(self, data: bytes) -> None:
        self._kept.append(data)
        self._kept_bytes += len(data)
        while self._kept_bytes > self.keep_bytes and len(self._kept) > 2:
            self._kept_bytes -= len(self._kept[1])  # the first may be written in part: it stays
            del self._kept[1]
            self._dropped += 1

    def _drain(self) -> None:
        while self._kept:
            data = self._kept[0]
            try:
                n = os.write(self._fd, data)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    return  # kept for the next line
                raise
            self._kept_bytes -= n
            if n < len(data):
                self._kept[0] = data[n:]
                continue
            self._kept.popleft()
            if not self._kept and self._dropped:
                note = logging.LogRecord(
                    "sidetune.logs",
                    logging.WARNING,
                    "",
                    0,
                    "%d log lines were dropped while the log's disk was full",
                    (self._dropped,),
                    None,
                )
                self._dropped = 0
                self._keep((self.format(note) + self.terminator).encode("utf-8", "replace"))


def configure_logging(json_lines: bool = True, level: int | str = logging.INFO, secrets: Iterable[str] = ()) -> None:
    """One handler on the root logger, on stderr (a `KeepingHandler`); every other logger (uvicorn's, Celery's)
    propagates to it.
    `secrets`: strings never written (the API keys)."""
    redact = Redactor(secrets)
    handler = KeepingHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if json_lines else TextFormatter(redact))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn's and Celery's own handlers would write a second, unformatted copy of their lines.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.redirected"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.captureWarnings(True)  # warnings become log lines too, not raw stderr
    sys.unraisablehook = _unraisable  # and so do exceptions Python can only ignore (a __del__, interpreter exit)


def _unraisable(info: Any) -> None:
    """An exception Python ignores (raised in a finalizer, often while the interpreter exits) as one log line, not
    the raw traceback it would print to stderr in the middle of a JSON log. Best effort: at exit, logging itself may
    be half torn down, and then the line is dropped rather than printed raw."""
    try:
        what = f" in {info.object!r}" if info.object is not None else ""
        message = f"{info.err_msg or 'Exception ignored'}{what}: {info.exc_type.__name__}: {info.exc_value}"
        logging.getLogger("sidetune.unraisable").warning(message)
    except Exception:  # noqa: BLE001 - nothing may escape an unraisable hook
        pass
