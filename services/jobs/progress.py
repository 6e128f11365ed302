"""How long-running services report progress and learn about cancellation, without knowing about Celery.

`JobReporter` writes to the job store (events and the job's `progress` field); tests and benchmarks use
`NullReporter`. Both writes are best effort: Redis refusing them (a full disk under its AOF, its memory limit) or
unreachable past the client's retries costs a line of progress or an event, never the job.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import redis

from storage.redis import JobStore
from storage.redis.records import Progress

log = logging.getLogger("sidetune.progress")


class Cancelled(Exception):
    """Raised inside a service when the job's cancel flag was seen."""


class Reporter(Protocol):
    def event(self, message: str, level: str = "info", type: str = "message", data: dict | None = None) -> None: ...
    def progress(self, stage: str, done: int, total: int, **extra: Any) -> None: ...
    def check_cancel(self) -> None: ...


class NullReporter:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def event(self, message: str, level: str = "info", type: str = "message", data: dict | None = None) -> None:
        self.events.append({"message": message, "level": level, "type": type, "data": data})

    def progress(self, stage: str, done: int, total: int, **extra: Any) -> None:
        pass

    def check_cancel(self) -> None:
        pass


class JobReporter:
    """Progress goes to the job record at most every `interval_s` (and always at the end of a stage)."""

    def __init__(self, store: JobStore, job_id: str, interval_s: float = 0.5) -> None:
        self.store = store
        self.job_id = job_id
        self.interval_s = interval_s
        self._last = 0.0

    def event(self, message: str, level: str = "info", type: str = "message", data: dict | None = None) -> None:
        try:
            self.store.add_event(self.job_id, message, level=level, type=type, data=data)
        except redis.RedisError as e:
            log.warning("job %s: event not recorded (%s: %s): %s", self.job_id, e.__class__.__name__, e, message)

    def progress(self, stage: str, done: int, total: int, **extra: Any) -> None:
        t = time.monotonic()
        if done < total and t - self._last < self.interval_s:
            return
        self._last = t
        try:
            self.store.set_fields(self.job_id, progress=Progress(stage=stage, done=done, total=total, **extra))
        except redis.RedisError as e:
            log.warning("job %s: progress not recorded (%s: %s)", self.job_id, type(e).__name__, e)

    def check_cancel(self) -> None:
        if self.store.cancel_requested(self.job_id):
            raise Cancelled(self.job_id)
