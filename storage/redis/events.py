"""A job's event log in Redis: progress, metrics and notices, appended by the workers and read by the API
(`GET /jobs/{id}/events?after=`). A list per job; an event's sequence number is its position in it."""

from __future__ import annotations

import json

import redis

from storage.redis import keys
from storage.redis.records import Event, now


class Events:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def add_event(
        self, job_id: str, message: str, level: str = "info", type: str = "message", data: dict | None = None
    ) -> int:
        """Append an event; its sequence number (1-based) is its position in the list."""
        event = {"created_at": now(), "level": level, "type": type, "message": message, "data": data}
        return self.r.rpush(keys.events(job_id), json.dumps(event))

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        raw = self.r.lrange(keys.events(job_id), after, after + limit - 1)
        return [{"seq": after + i + 1, **json.loads(e)} for i, e in enumerate(raw)]
