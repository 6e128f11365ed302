"""The job store: one Redis connection and the owners of what is kept in it, behind one object the API and the workers
pass around.

Each concern has one owner in this package (jobs.py, events.py, models.py, workers.py, datasets.py, usage.py,
locks.py), and every key is named in keys.py. `JobStore` composes them: its methods forward to the owner (so
`store.get_job(id)` reads as it always did), and it hands out the owners and leases that callers need
(`store.datasets`, `store.usage`, `store.pins()`, `store.extraction_lock(...)`), so no code outside storage/ touches
the Redis client or a key (tests/storage/test_redis_owners.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from storage.faults import refusal_text, refuses_writes
from storage.redis import keys
from storage.redis.datasets import DatasetRecords
from storage.redis.events import Events
from storage.redis.jobs import Jobs
from storage.redis.locks import LeaseLock, Pin, Pins
from storage.redis.models import Models
from storage.redis.records import Event, JobRecord, ModelRecord, RunningStep, now
from storage.redis.usage import Usage
from storage.redis.workers import Workers
from storage.specs import ResolvedRecord, SpecRecord


class JobStore:
    def __init__(self, client: redis.Redis, probe: redis.Redis | None = None) -> None:
        self.r = client  # for storage/ and tests only: the rest of the code goes through the owners
        self._probe = probe or client
        self.event_log = Events(client)
        self.jobs = Jobs(client, self.event_log)
        self.usage = Usage(client)
        self.models = Models(client, self.usage)
        self.workers = Workers(client, self.jobs)
        self.datasets = DatasetRecords(client)

    @classmethod
    def from_url(cls, url: str, fail_fast: bool = False) -> JobStore:
        """A workers' store rides out a Redis restart (about 30 s of retries) instead of failing the step that was
        writing: the record it writes is what the job's progress depends on. A `fail_fast` one (the API's) gives up
        within about a second, so a request gets its 503 at once while Redis is down or restarting."""
        if fail_fast:
            retry, timeouts = Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=2), {"socket_connect_timeout": 0.5}
        else:
            retry, timeouts = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=40), {}
        errors = [redis.ConnectionError, redis.TimeoutError]
        client = redis.Redis.from_url(url, decode_responses=True, retry=retry, retry_on_error=errors, **timeouts)
        probe = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
        return cls(client, probe)

    # ---- jobs (storage/redis/jobs.py) -------------------------------------------------------------------------------
    def create_job(
        self,
        spec: SpecRecord,
        owner: str | None = None,
        job_id: str | None = None,
        limit: int | None = None,
        resolved: ResolvedRecord | None = None,
        status: str = "queued",
    ) -> JobRecord:
        return self.jobs.create_job(spec, owner, job_id, limit, resolved, status)

    def create_job_once(
        self,
        key: str,
        spec: SpecRecord,
        owner: str | None = None,
        ttl_s: int = 24 * 3600,
        limit: int | None = None,
        resolved: ResolvedRecord | None = None,
        status: str = "queued",
    ) -> tuple[JobRecord, bool]:
        return self.jobs.create_job_once(key, spec, owner, ttl_s, limit, resolved, status)

    def get_job(self, job_id: str) -> JobRecord:
        return self.jobs.get_job(job_id)

    def jobs_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        return self.jobs.jobs_many(job_ids)

    def list_jobs(self, limit: int = 20, after: str | None = None, owner: str | None = None) -> list[JobRecord]:
        return self.jobs.list_jobs(limit, after, owner)

    def update_job(self, job_id: str, change: Callable[[JobRecord], JobRecord | None]) -> JobRecord:
        return self.jobs.update_job(job_id, change)

    def set_fields(self, job_id: str, **fields: Any) -> JobRecord:
        return self.jobs.set_fields(job_id, **fields)

    def count_by_status(self) -> dict[str, int]:
        return self.jobs.count_by_status()

    def job_ids_with_status(self, status: str) -> list[str]:
        return self.jobs.job_ids_with_status(status)

    def active_jobs(self, owner: str | None) -> int:
        return self.jobs.active_jobs(owner)

    def queue_position(self, job_id: str) -> int:
        return self.jobs.queue_position(job_id)

    def request_cancel(self, job_id: str) -> JobRecord:
        return self.jobs.request_cancel(job_id)

    def delete_job(self, job_id: str) -> JobRecord:
        return self.jobs.delete_job(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return self.jobs.cancel_requested(job_id)

    # ---- events (storage/redis/events.py) ---------------------------------------------------------------------------
    def add_event(
        self, job_id: str, message: str, level: str = "info", type: str = "message", data: dict | None = None
    ) -> int:
        return self.event_log.add_event(job_id, message, level, type, data)

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        return self.event_log.events(job_id, after, limit)

    # ---- models (storage/redis/models.py) ---------------------------------------------------------------------------
    def register_model(self, model: ModelRecord) -> ModelRecord:
        return self.models.register_model(model)

    def delete_model(self, model_id: str) -> None:
        self.models.delete_model(model_id)

    def registered_models(self, model_ids: list[str]) -> set[str]:
        return self.models.registered_models(model_ids)

    def get_model(self, model_id: str) -> ModelRecord:
        return self.models.get_model(model_id)

    def list_models(self, limit: int = 100, owner: str | None = None) -> list[ModelRecord]:
        return self.models.list_models(limit, owner)

    # ---- workers (storage/redis/workers.py) -------------------------------------------------------------------------
    def heartbeat(self, queue: str, worker: str, ttl_s: float = 15.0) -> None:
        self.workers.heartbeat(queue, worker, ttl_s)

    def worker_alive(self, worker: str) -> bool:
        return self.workers.worker_alive(worker)

    def live_workers(self) -> dict[str, int]:
        return self.workers.live_workers()

    def step_started(self, job_id: str, step: RunningStep) -> None:
        self.workers.step_started(job_id, step)

    def step_finished(self, job_id: str) -> None:
        self.workers.step_finished(job_id)

    def running_steps(self) -> dict[str, dict[str, RunningStep]]:
        return self.workers.running_steps()

    def drop_step(self, job_id: str, worker: str) -> bool:
        return self.workers.drop_step(job_id, worker)

    def train_lock(self, job_id: str) -> LeaseLock:
        """The lease of the one train step of job `job_id` that may run (a step sent twice waits on it)."""
        return LeaseLock(self.r, keys.train_lock(job_id))

    # ---- the feature cache's leases (storage/redis/locks.py) --------------------------------------------------------
    def extraction_lock(self, cache_key: str, job_id: str) -> LeaseLock:
        """The lock of the job extracting cache entry `cache_key`; its token is the job id, so the job's shard tasks
        can adopt it."""
        return LeaseLock(self.r, keys.CACHE_LOCK + cache_key, token=job_id)

    def pin(self, cache_key: str, holder: str | None = None, ttl_s: float = 60.0) -> Pin:
        """A pin that keeps cache entry `cache_key` from eviction while `holder` (a job id) reads it."""
        return Pin(self.r, cache_key, holder=holder, ttl_s=ttl_s)

    def pins(self) -> Pins:
        """Every entry's pins, and FeatureCache.evict's guard."""
        return Pins(self.r)

    # ---- health (no retries: for /healthz and /readyz) --------------------------------------------------------------
    def ping(self) -> bool:
        """Whether Redis answers now."""
        return bool(self._probe.ping())

    def write_refusal(self) -> str | None:
        """Why Redis refuses writes now (its answer: `MISCONF ...` after a failed AOF write or snapshot, `OOM ...`
        under maxmemory), or None when a write goes through; a connection error when it does not answer."""
        try:
            self._probe.set(keys.HEALTH_WRITE, now(), px=10_000)
        except redis.ResponseError as e:
            if refuses_writes(e):
                return refusal_text(e)
            raise
        return None
