"""The job store: job records, their event logs and the model registry, in Redis.

Job state lives here, not in Celery's result backend, so it survives worker crashes and Redis restarts
(AOF) and can be read by the API without Celery. Records are JSON strings; updates are optimistic
transactions (WATCH/MULTI), so a cancel from the API and a status change from a worker never clobber
each other.
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


class JobStore:
    def __init__(self, client: redis.Redis, probe: redis.Redis | None = None) -> None:
        self.r = client
        self._probe = probe or client

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
    def create_job(self, spec: dict[str, Any], owner: str | None = None, job_id: str | None = None) -> dict[str, Any]:
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
        }
        seq = self.r.incr("jobs:seq")  # the listing order: ids alone tie within a millisecond
        pipe = self.r.pipeline()
        pipe.set(f"job:{job['id']}", json.dumps(job))
        pipe.zadd("jobs", {job["id"]: seq})
        pipe.sadd(f"jobs:status:{job['status']}", job["id"])
        pipe.execute()
        return job

    def create_job_once(
        self, key: str, spec: dict[str, Any], owner: str | None = None, ttl_s: int = 24 * 3600
    ) -> tuple[dict[str, Any], bool]:
        """The job this owner created with idempotency `key` (and the same spec) in the last `ttl_s`, or a new
        one; returns (job, created). The key is claimed with SET NX before the job exists, so two concurrent
        retries create one job. Raises IdempotencyConflict if the key was used with another spec."""
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        slot = f"idem:{owner or '-'}:{hashlib.sha256(key.encode()).hexdigest()}"
        job_id = new_id("job")
        if self.r.set(slot, json.dumps({"job": job_id, "spec": digest}), nx=True, ex=ttl_s):
            return self.create_job(spec, owner, job_id=job_id), True
        claim = json.loads(self.r.get(slot) or "null")
        if claim is None:  # expired in between: claim it afresh
            return self.create_job_once(key, spec, owner, ttl_s)
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
        pipe = self.r.pipeline()
        pipe.set(f"model:{model['id']}", json.dumps(model))
        pipe.zadd("models", {model["id"]: model["created_at"]})
        pipe.execute()
        return model

    def delete_model(self, model_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.delete(f"model:{model_id}")
        pipe.zrem("models", model_id)
        pipe.execute()

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
