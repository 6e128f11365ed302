"""The job store: job records, their event logs and the model registry, in Redis.

Job state lives here, not in Celery's result backend, so it survives worker crashes and Redis restarts
(AOF) and can be read by the API without Celery. Records are JSON strings; updates are optimistic
transactions (WATCH/MULTI), so a cancel from the API and a status change from a worker never clobber
each other. Each owner's unfinished jobs are a sorted set in submission order: its jobs quota is checked against it in
the script that records a job, and a job's place in it is its steps' priority (worker/celery_app.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from storage.quotas import ARTIFACTS, TooManyJobs, Usage, owner_key

STATUSES = ("queued", "extracting", "training", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class NotFound(KeyError):
    """No record with that id."""


class Busy(ValueError):
    """A job that is still queued or running, where only a finished one will do."""


class IdempotencyConflict(ValueError):
    """An idempotency key reused with a different request."""


def new_id(prefix: str) -> str:
    """Ids that sort roughly by creation time (`job_<ms hex><random hex>`)."""
    return f"{prefix}_{int(time.time() * 1000):012x}{os.urandom(5).hex()}"


def model_id_for(job_id: str) -> str:
    """One model per job, with an id derived from the job's, so a repeated train step writes the same model."""
    return "model_" + job_id.removeprefix("job_")


def job_id_for(model_id: str) -> str:
    """The job that trains (or trained) the model of this id."""
    return "job_" + model_id.removeprefix("model_")


def worker_name() -> str:
    """This process as a worker: what its heartbeats and running steps are keyed by."""
    return f"{socket.gethostname()}-{os.getpid()}"


def now() -> float:
    return round(time.time(), 3)


def _active(owner: str | None) -> str:
    """The sorted set of an owner's unfinished jobs, scored by submission order."""
    return f"jobs:active:{owner_key(owner)}"


# KEYS: the record, the listing, the queued set, the owner's unfinished jobs, the sequence; ARGV: the record, its id,
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


class JobStore:
    def __init__(self, client: redis.Redis, probe: redis.Redis | None = None) -> None:
        self.r = client
        self._probe = probe or client
        self._create = client.register_script(_CREATE)
        self._active_indexed = False

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

    # ---- jobs -------------------------------------------------------------------------------------
    def create_job(
        self,
        spec: dict[str, Any],
        owner: str | None = None,
        job_id: str | None = None,
        limit: int | None = None,
        resolved: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record a queued job, with its resolved job (services/jobs/resolved.py) when given. With `limit`, refused
        (TooManyJobs) when its owner has that many jobs queued or running: counted and written in one script, so
        concurrent submissions never pass it together."""
        job = {
            "id": job_id or new_id("job"),
            "object": "job",
            "status": "queued",
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
        # "jobs:seq" gives the listing order (ids alone tie within a millisecond) and the owner's queue order
        keys = [f"job:{job['id']}", "jobs", "jobs:status:queued", _active(owner), "jobs:seq"]
        admitted, active = self._create(keys=keys, args=[json.dumps(job), job["id"], -1 if limit is None else limit])
        if not admitted:
            raise TooManyJobs(active, limit)
        return job

    def create_job_once(
        self,
        key: str,
        spec: dict[str, Any],
        owner: str | None = None,
        ttl_s: int = 24 * 3600,
        limit: int | None = None,
        resolved: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """The job this owner created with idempotency `key` (and the same spec) in the last `ttl_s`, or a new
        one; returns (job, created). The key is claimed with SET NX before the job exists, so two concurrent
        retries create one job. Raises IdempotencyConflict if the key was used with another spec."""
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        slot = f"idem:{owner or '-'}:{hashlib.sha256(key.encode()).hexdigest()}"
        job_id = new_id("job")
        if self.r.set(slot, json.dumps({"job": job_id, "spec": digest}), nx=True, ex=ttl_s):
            try:
                return self.create_job(spec, owner, job_id=job_id, limit=limit, resolved=resolved), True
            except TooManyJobs:
                self.r.delete(slot)  # refused: a retry with this key may be admitted later
                raise
        claim = json.loads(self.r.get(slot) or "null")
        if claim is None:  # expired in between: claim it afresh
            return self.create_job_once(key, spec, owner, ttl_s, limit, resolved)
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

    def get_job(self, job_id: str) -> dict[str, Any]:
        raw = self.r.get(f"job:{job_id}")
        if raw is None:
            raise NotFound(job_id)
        return json.loads(raw)

    def list_jobs(self, limit: int = 20, after: str | None = None, owner: str | None = None) -> list[dict]:
        """Newest first; `after` is the id of the last job of the previous page."""
        start = 0
        if after is not None:
            rank = self.r.zrevrank("jobs", after)
            if rank is None:
                raise NotFound(after)
            start = rank + 1
        out: list[dict] = []
        while len(out) < limit:
            ids = self.r.zrevrange("jobs", start, start + limit * 2)
            if not ids:
                break
            start += len(ids)
            for raw in self.r.mget([f"job:{i}" for i in ids]):
                if raw is None:
                    continue
                job = json.loads(raw)
                if owner is None or job.get("owner") == owner:
                    out.append(job)
                    if len(out) == limit:
                        break
        return out

    def _job_transaction(self, job_id: str, write: Callable[[Any, dict], Any]) -> Any:
        """Read the job's record under WATCH and run `write(pipe, job)`, which queues the writes in a MULTI;
        retried when another client changed the record meanwhile. Returns what `write` returned."""
        key = f"job:{job_id}"
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

    def update_job(self, job_id: str, change: Callable[[dict], dict | None]) -> dict[str, Any]:
        """Apply `change` to the stored record atomically; it may edit in place or return a new dict."""

        def write(pipe: Any, job: dict) -> dict:
            before = job["status"]
            job = change(job) or job
            job["updated_at"] = now()
            pipe.set(f"job:{job_id}", json.dumps(job))
            if job["status"] != before:  # the per-status sets that /metrics counts change with the record
                pipe.srem(f"jobs:status:{before}", job_id)
                pipe.sadd(f"jobs:status:{job['status']}", job_id)
                if job["status"] in TERMINAL:  # no longer counts against its owner's quota, nor ahead of its jobs
                    pipe.zrem(_active(job.get("owner")), job_id)
            return job

        return self._job_transaction(job_id, write)

    def set_fields(self, job_id: str, **fields: Any) -> dict[str, Any]:
        return self.update_job(job_id, lambda job: job.update(fields))

    # ---- jobs by status (for /metrics): a set of ids per status, changed in the record's own transaction ----
    def count_by_status(self) -> dict[str, int]:
        if not self.r.exists("jobs:status:indexed"):
            self._index_statuses()
        pipe = self.r.pipeline(transaction=False)
        for status in STATUSES:
            pipe.scard(f"jobs:status:{status}")
        return dict(zip(STATUSES, pipe.execute(), strict=True))

    def job_ids_with_status(self, status: str) -> list[str]:
        return sorted(self.r.smembers(f"jobs:status:{status}"))

    def _index_statuses(self) -> None:
        """Once, for jobs recorded before the sets existed: file each under its status, in a transaction like
        `update_job`'s, so a concurrent status change is never undone."""

        def file(pipe: Any, job: dict) -> None:
            for status in STATUSES:
                if status != job["status"]:
                    pipe.srem(f"jobs:status:{status}", job["id"])
            pipe.sadd(f"jobs:status:{job['status']}", job["id"])

        for job_id in self.r.zrange("jobs", 0, -1):
            try:
                self._job_transaction(job_id, file)
            except NotFound:  # deleted meanwhile
                continue
        self.r.set("jobs:status:indexed", 1)

    # ---- each owner's unfinished jobs (quota, and the order the queues serve them in) ---------------------------
    def active_jobs(self, owner: str | None) -> int:
        """How many jobs `owner` has queued or running."""
        self._index_active()
        return self.r.zcard(_active(owner))

    def queue_position(self, job_id: str) -> int:
        """How many of the job's owner's unfinished jobs were submitted before it (0: its owner's first)."""
        self._index_active()
        return self.r.zrank(_active(self.get_job(job_id).get("owner")), job_id) or 0

    def _index_active(self) -> None:
        """Once, for jobs recorded before the owners' sets existed: file each unfinished job under its owner, in
        submission order."""
        if self._active_indexed or self.r.exists("jobs:active:indexed"):
            self._active_indexed = True
            return
        for job_id, seq in self.r.zrange("jobs", 0, -1, withscores=True):

            def file(pipe: Any, job: dict, job_id: str = job_id, seq: float = seq) -> None:
                if job["status"] not in TERMINAL:  # read under WATCH: a job ending meanwhile is never filed
                    pipe.zadd(_active(job.get("owner")), {job_id: seq}, nx=True)

            try:
                self._job_transaction(job_id, file)
            except NotFound:  # deleted meanwhile
                continue
        self.r.set("jobs:active:indexed", 1)
        self._active_indexed = True

    def request_cancel(self, job_id: str) -> dict[str, Any]:
        """Queued jobs are cancelled at once; running ones at the task's next check (cooperative)."""

        cancelled_now = False

        def change(job: dict) -> None:
            nonlocal cancelled_now
            if job["status"] in TERMINAL:
                return
            job["cancel_requested"] = True
            if job["status"] == "queued":
                job["status"] = "cancelled"
                cancelled_now = True

        job = self.update_job(job_id, change)
        if cancelled_now:
            self.add_event(job_id, "cancelled", level="warning")
        return job

    def delete_job(self, job_id: str) -> dict[str, Any]:
        """Delete a finished job's record and events (its model, checkpoints and cache entries are not touched);
        Busy while it is queued or running. Returns the record deleted."""

        def write(pipe: Any, job: dict) -> dict:
            if job["status"] not in TERMINAL:
                raise Busy(job["status"])
            pipe.delete(f"job:{job_id}", f"job:{job_id}:events", f"running:{job_id}")
            pipe.zrem("jobs", job_id)
            pipe.srem(f"jobs:status:{job['status']}", job_id)
            pipe.srem("requeued", job_id)
            pipe.srem("running", job_id)
            pipe.zrem(_active(job.get("owner")), job_id)
            return job

        return self._job_transaction(job_id, write)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.get_job(job_id).get("cancel_requested"))

    # ---- events -----------------------------------------------------------------------------------
    def add_event(
        self, job_id: str, message: str, level: str = "info", type: str = "message", data: dict | None = None
    ) -> int:
        """Append an event; its sequence number (1-based) is its position in the list."""
        event = {"created_at": now(), "level": level, "type": type, "message": message, "data": data}
        return self.r.rpush(f"job:{job_id}:events", json.dumps(event))

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        raw = self.r.lrange(f"job:{job_id}:events", after, after + limit - 1)
        return [{"seq": after + i + 1, **json.loads(e)} for i, e in enumerate(raw)]

    # ---- models -----------------------------------------------------------------------------------
    def register_model(self, model: dict[str, Any]) -> dict[str, Any]:
        """Record a model; its `size_bytes` counts against its owner's models quota once (a repeated train step
        registers the same model again)."""
        key, blob = f"model:{model['id']}", json.dumps(model)
        fresh = self.r.set(key, blob, nx=True)
        pipe = self.r.pipeline()
        if not fresh:
            pipe.set(key, blob)
        pipe.zadd("models", {model["id"]: model["created_at"]})
        if fresh:
            pipe.hincrby(f"usage:{owner_key(model.get('owner'))}", ARTIFACTS, int(model.get("size_bytes") or 0))
        pipe.execute()
        return model

    def delete_model(self, model_id: str) -> None:
        raw = self.r.get(f"model:{model_id}")
        pipe = self.r.pipeline()
        pipe.delete(f"model:{model_id}")
        pipe.zrem("models", model_id)
        deleted, _ = pipe.execute()
        if deleted and raw:  # the one caller that removed it gives its bytes back
            model = json.loads(raw)
            Usage(self.r).add(model.get("owner"), ARTIFACTS, -int(model.get("size_bytes") or 0))

    def registered_models(self, model_ids: list[str]) -> set[str]:
        """Which of `model_ids` are registered (not deleted), in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for model_id in model_ids:
            pipe.exists(f"model:{model_id}")
        return {model_id for model_id, n in zip(model_ids, pipe.execute(), strict=True) if n}

    def get_model(self, model_id: str) -> dict[str, Any]:
        raw = self.r.get(f"model:{model_id}")
        if raw is None:
            raise NotFound(model_id)
        return json.loads(raw)

    def list_models(self, limit: int = 100, owner: str | None = None) -> list[dict[str, Any]]:
        ids = self.r.zrevrange("models", 0, -1)
        models = [json.loads(raw) for raw in self.r.mget([f"model:{i}" for i in ids]) if raw] if ids else []
        return [m for m in models if owner is None or m.get("owner") == owner][:limit]

    # ---- worker heartbeats (for /readyz, shard counts and the watchdog) ------------------------------
    def heartbeat(self, queue: str, worker: str, ttl_s: float = 15.0) -> None:
        self.r.set(f"worker:{queue}:{worker}", now(), px=int(ttl_s * 1000))

    def worker_alive(self, worker: str) -> bool:
        return any(True for _ in self.r.scan_iter(f"worker:*:{worker}"))

    # ---- running steps (which worker runs which step of which job; the watchdog requeues dead ones) --------
    def step_started(self, job_id: str, step: dict[str, Any]) -> None:
        self.r.hset(f"running:{job_id}", worker_name(), json.dumps(step))
        self.r.sadd("running", job_id)
        self.set_fields(job_id, requeued_at=None)  # picked up (again)

    def step_finished(self, job_id: str) -> None:
        self.r.hdel(f"running:{job_id}", worker_name())

    def running_steps(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{job_id: {worker: step}} of every step in progress."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for job_id in self.r.smembers("running"):
            steps = self.r.hgetall(f"running:{job_id}")
            if steps:
                out[job_id] = {w: json.loads(v) for w, v in steps.items()}
            else:
                self.r.srem("running", job_id)
        return out

    def drop_step(self, job_id: str, worker: str) -> bool:
        """Forget a dead worker's step; True for the one caller that removed it (so it is requeued once)."""
        return bool(self.r.hdel(f"running:{job_id}", worker))

    def live_workers(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for key in self.r.scan_iter("worker:*"):
            queue = key.split(":")[1]
            counts[queue] = counts.get(queue, 0) + 1
        return counts

    def ping(self) -> bool:
        """Whether Redis answers now (no retries: for health checks)."""
        return bool(self._probe.ping())

    def write_refusal(self) -> str | None:
        """Why Redis refuses writes now (its answer: `MISCONF ...` after a failed AOF write or snapshot, `OOM ...`
        under maxmemory), or None when a write goes through; a connection error when it does not answer (no retries:
        for health checks)."""
        from storage.faults import refusal_text, refuses_writes

        try:
            self._probe.set("health:write", now(), px=10_000)
        except redis.ResponseError as e:
            if refuses_writes(e):
                return refusal_text(e)
            raise
        return None
