"""Job records in Redis: create (with the owner's jobs quota), read, list, update, cancel and delete, and the indexes
kept with them (the per-status sets /metrics counts, each owner's unfinished jobs).

Job state lives here, not in Celery's result backend, so it survives worker crashes and Redis restarts
(AOF) and can be read by the API without Celery. Records are JSON strings; updates are optimistic
transactions (WATCH/MULTI), so a cancel from the API and a status change from a worker never clobber
each other. Each owner's unfinished jobs are a sorted set in submission order: its jobs quota is checked against it in
the script that records a job, and a job's place in it is its steps' priority (worker/celery_app.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import redis

from storage.quotas import TooManyJobs
from storage.redis import keys
from storage.redis.events import Events
from storage.redis.records import JobRecord, NotFound, new_id, now
from storage.specs import ResolvedRecord, SpecRecord

STATUSES = ("planning", "queued", "extracting", "training", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class Busy(ValueError):
    """A job that is still queued or running, where only a finished one will do."""


class IdempotencyConflict(ValueError):
    """An idempotency key reused with a different request."""


# KEYS: the record, the listing, its status's set, the owner's unfinished jobs, the sequence; ARGV: the record, its id,
# the owner's limit (-1: none). Returns {admitted 0/1, the owner's unfinished jobs (before refusing, after admitting)}.
_CREATE = """
local active, limit = redis.call('ZCARD', KEYS[4]), tonumber(ARGV[3])
if limit >= 0 and active >= limit then return {0, active} end
local seq = redis.call('INCR', KEYS[5])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], seq, ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[4], seq, ARGV[2])
return {1, active + 1}
"""


class Jobs:
    """The job records and their indexes; a cancel of a queued job is told in its event log (`events`)."""

    def __init__(self, client: redis.Redis, events: Events) -> None:
        self.r = client
        self.events = events
        self._create = client.register_script(_CREATE)
        self._active_indexed = False

    def create_job(
        self,
        spec: SpecRecord,
        owner: str | None = None,
        job_id: str | None = None,
        limit: int | None = None,
        resolved: ResolvedRecord | None = None,
        status: str = "queued",
    ) -> JobRecord:
        """Record a job, `queued` (with its `resolved` job) or `planning` (the plan step records it). With `limit`,
        refused (TooManyJobs) when its owner has that many jobs queued or running: counted and written in one script,
        so concurrent submissions never pass it together."""
        job: JobRecord = {
            "id": job_id or new_id("job"),
            "object": "job",
            "status": status,
            "created_at": now(),
            "updated_at": now(),
            "owner": owner,
            "spec": spec,
            "progress": None,
            "metrics": {},
            "error": None,
            "model_id": None,
            "cancel_requested": False,
            "resolved": resolved,
        }
        self._index_active()
        # the sequence gives the listing order (ids alone tie within a millisecond) and the owner's queue order
        names = [keys.job(job["id"]), keys.JOBS, keys.jobs_with_status(status), keys.active_jobs(owner), keys.JOBS_SEQ]
        admitted, active = self._create(keys=names, args=[json.dumps(job), job["id"], -1 if limit is None else limit])
        if not admitted:
            raise TooManyJobs(active, limit)
        return job

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
        """The job this owner created with idempotency `key` (and the same spec) in the last `ttl_s`, or a new
        one; returns (job, created). The key is claimed with SET NX before the job exists, so two concurrent
        retries create one job. Raises IdempotencyConflict if the key was used with another spec."""
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        slot = keys.idempotency(owner, hashlib.sha256(key.encode()).hexdigest())
        job_id = new_id("job")
        if self.r.set(slot, json.dumps({"job": job_id, "spec": digest}), nx=True, ex=ttl_s):
            try:
                return self.create_job(spec, owner, job_id, limit, resolved, status), True
            except TooManyJobs:
                self.r.delete(slot)  # refused: a retry with this key may be admitted later
                raise
        claim = json.loads(self.r.get(slot) or "null")
        if claim is None:  # expired in between: claim it afresh
            return self.create_job_once(key, spec, owner, ttl_s, limit, resolved, status)
        if claim["spec"] != digest:
            raise IdempotencyConflict(key)
        deadline = time.monotonic() + 5.0
        while True:  # the first request may still be writing the record it claimed
            try:
                return self.get_job(claim["job"]), False
            except NotFound:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def get_job(self, job_id: str) -> JobRecord:
        raw = self.r.get(keys.job(job_id))
        if raw is None:
            raise NotFound(job_id)
        return json.loads(raw)

    def jobs_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        """The records of `job_ids` in one round trip, None for each that does not exist."""
        raws = self.r.mget([keys.job(i) for i in job_ids]) if job_ids else []
        return [None if raw is None else json.loads(raw) for raw in raws]

    def list_jobs(self, limit: int = 20, after: str | None = None, owner: str | None = None) -> list[JobRecord]:
        """Newest first; `after` is the id of the last job of the previous page."""
        start = 0
        if after is not None:
            rank = self.r.zrevrank(keys.JOBS, after)
            if rank is None:
                raise NotFound(after)
            start = rank + 1
        out: list[JobRecord] = []
        while len(out) < limit:
            ids = self.r.zrevrange(keys.JOBS, start, start + limit * 2)
            if not ids:
                break
            start += len(ids)
            for job in self.jobs_many(ids):
                if job is None:
                    continue
                if owner is None or job.get("owner") == owner:
                    out.append(job)
                    if len(out) == limit:
                        break
        return out

    def _job_transaction(self, job_id: str, write: Callable[[Any, JobRecord], Any]) -> Any:
        """Read the job's record under WATCH and run `write(pipe, job)`, which queues the writes in a MULTI;
        retried when another client changed the record meanwhile. Returns what `write` returned."""
        key = keys.job(job_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise NotFound(job_id)
                    record = json.loads(raw)
                    pipe.multi()
                    result = write(pipe, record)
                    pipe.execute()
                    return result
                except redis.WatchError:
                    continue

    def update_job(self, job_id: str, change: Callable[[JobRecord], JobRecord | None]) -> JobRecord:
        """Apply `change` to the stored record atomically; it may edit in place or return a new dict."""

        def write(pipe: Any, job: JobRecord) -> JobRecord:
            before = job["status"]
            job = change(job) or job
            job["updated_at"] = now()
            pipe.set(keys.job(job_id), json.dumps(job))
            if job["status"] != before:  # the per-status sets that /metrics counts change with the record
                pipe.srem(keys.jobs_with_status(before), job_id)
                pipe.sadd(keys.jobs_with_status(job["status"]), job_id)
                if job["status"] in TERMINAL:  # no longer counts against its owner's quota, nor ahead of its jobs
                    pipe.zrem(keys.active_jobs(job.get("owner")), job_id)
            return job

        return self._job_transaction(job_id, write)

    def set_fields(self, job_id: str, **fields: Any) -> JobRecord:
        return self.update_job(job_id, lambda job: job.update(fields))

    # ---- jobs by status (for /metrics): a set of ids per status, changed in the record's own transaction ----
    def count_by_status(self) -> dict[str, int]:
        if not self.r.exists(keys.JOBS_STATUS_INDEXED):
            self._index_statuses()
        pipe = self.r.pipeline(transaction=False)
        for status in STATUSES:
            pipe.scard(keys.jobs_with_status(status))
        return dict(zip(STATUSES, pipe.execute(), strict=True))

    def job_ids_with_status(self, status: str) -> list[str]:
        return sorted(self.r.smembers(keys.jobs_with_status(status)))

    def _index_statuses(self) -> None:
        """Once, for jobs recorded before the sets existed: file each under its status, in a transaction like
        `update_job`'s, so a concurrent status change is never undone."""

        def file(pipe: Any, job: JobRecord) -> None:
            for status in STATUSES:
                if status != job["status"]:
                    pipe.srem(keys.jobs_with_status(status), job["id"])
            pipe.sadd(keys.jobs_with_status(job["status"]), job["id"])

        for job_id in self.r.zrange(keys.JOBS, 0, -1):
            try:
                self._job_transaction(job_id, file)
            except NotFound:  # deleted meanwhile
                continue
        self.r.set(keys.JOBS_STATUS_INDEXED, 1)

    # ---- each owner's unfinished jobs (quota, and the order the queues serve them in) ---------------------------
    def active_jobs(self, owner: str | None) -> int:
        """How many jobs `owner` has queued or running."""
        self._index_active()
        return self.r.zcard(keys.active_jobs(owner))

    def queue_position(self, job_id: str) -> int:
        """How many of the job's owner's unfinished jobs were submitted before it (0: its owner's first)."""
        self._index_active()
        return self.r.zrank(keys.active_jobs(self.get_job(job_id).get("owner")), job_id) or 0

    def _index_active(self) -> None:
        """Once, for jobs recorded before the owners' sets existed: file each unfinished job under its owner, in
        submission order."""
        if self._active_indexed or self.r.exists(keys.JOBS_ACTIVE_INDEXED):
            self._active_indexed = True
            return
        for job_id, seq in self.r.zrange(keys.JOBS, 0, -1, withscores=True):

            def file(pipe: Any, job: JobRecord, job_id: str = job_id, seq: float = seq) -> None:
                if job["status"] not in TERMINAL:  # read under WATCH: a job ending meanwhile is never filed
                    pipe.zadd(keys.active_jobs(job.get("owner")), {job_id: seq}, nx=True)

            try:
                self._job_transaction(job_id, file)
            except NotFound:  # deleted meanwhile
                continue
        self.r.set(keys.JOBS_ACTIVE_INDEXED, 1)
        self._active_indexed = True

    def request_cancel(self, job_id: str) -> JobRecord:
        """Jobs planning or queued are cancelled at once (the plan step, finding it so, never queues it for
        extraction); running ones at the task's next check (cooperative)."""

        cancelled_now = False

        def change(job: JobRecord) -> None:
            nonlocal cancelled_now
            if job["status"] in TERMINAL:
                return
            job["cancel_requested"] = True
            if job["status"] in ("planning", "queued"):
                job["status"] = "cancelled"
                cancelled_now = True

        job = self.update_job(job_id, change)
        if cancelled_now:
            self.events.add_event(job_id, "cancelled", level="warning")
        return job

    def delete_job(self, job_id: str) -> JobRecord:
        """Delete a finished job's record and events (its model, checkpoints and cache entries are not touched);
        Busy while it is queued or running. Returns the record deleted."""

        def write(pipe: Any, job: JobRecord) -> JobRecord:
            if job["status"] not in TERMINAL:
                raise Busy(job["status"])
            pipe.delete(keys.job(job_id), keys.events(job_id), keys.running(job_id))
            pipe.zrem(keys.JOBS, job_id)
            pipe.srem(keys.jobs_with_status(job["status"]), job_id)
            pipe.srem(keys.REQUEUED, job_id)
            pipe.srem(keys.RUNNING, job_id)
            pipe.zrem(keys.active_jobs(job.get("owner")), job_id)
            return job

        return self._job_transaction(job_id, write)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.get_job(job_id).get("cancel_requested"))
