"""Workers in Redis: their heartbeats (for /readyz, shard counts and the watchdog), the steps each runs, the steps
the watchdog requeued until a worker takes them up, and the turns workers take at shared chores (the watchdog's lease,
the checkpoint sweep's claim)."""

from __future__ import annotations

import json
import os
import socket

import redis

from storage.redis import keys
from storage.redis.jobs import Jobs
from storage.redis.locks import LeaseLock
from storage.redis.records import RunningStep, now


def worker_name() -> str:
    """This process as a worker: what its heartbeats and running steps are keyed by."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Workers:
    def __init__(self, client: redis.Redis, jobs: Jobs) -> None:
        self.r = client
        self.jobs = jobs

    # ---- heartbeats ---------------------------------------------------------------------------------------------
    def heartbeat(self, queue: str, worker: str, ttl_s: float = 15.0) -> None:
        self.r.set(keys.worker(queue, worker), now(), px=int(ttl_s * 1000))

    def worker_alive(self, worker: str) -> bool:
        return any(True for _ in self.r.scan_iter(keys.heartbeats_of(worker)))

    def live_workers(self) -> dict[str, int]:
        """{queue: how many workers beat on it}."""
        counts: dict[str, int] = {}
        for key in self.r.scan_iter(keys.WORKERS):
            queue = key.split(":")[1]
            counts[queue] = counts.get(queue, 0) + 1
        return counts

    # ---- running steps (which worker runs which step of which job; the watchdog requeues dead ones) --------------
    def step_started(self, job_id: str, step: RunningStep) -> None:
        self.r.hset(keys.running(job_id), worker_name(), json.dumps(step))
        self.r.sadd(keys.RUNNING, job_id)
        self.jobs.set_fields(job_id, requeued_at=None)  # picked up (again)

    def step_finished(self, job_id: str) -> None:
        self.r.hdel(keys.running(job_id), worker_name())

    def running_steps(self) -> dict[str, dict[str, RunningStep]]:
        """{job_id: {worker: step}} of every step in progress."""
        out: dict[str, dict[str, RunningStep]] = {}
        for job_id in self.r.smembers(keys.RUNNING):
            steps = self.r.hgetall(keys.running(job_id))
            if steps:
                out[job_id] = {w: json.loads(v) for w, v in steps.items()}
            else:
                self.r.srem(keys.RUNNING, job_id)
        return out

    def drop_step(self, job_id: str, worker: str) -> bool:
        """Forget a dead worker's step; True for the one caller that removed it (so it is requeued once)."""
        return bool(self.r.hdel(keys.running(job_id), worker))

    # ---- requeued steps (until a worker takes one up, or the watchdog gives up on it) ----------------------------
    def mark_requeued(self, job_id: str) -> None:
        self.r.sadd(keys.REQUEUED, job_id)

    def requeued(self) -> set[str]:
        """The jobs whose step was requeued and not yet settled (taken up, ended or failed)."""
        return set(self.r.smembers(keys.REQUEUED))

    def settle_requeued(self, job_id: str) -> None:
        self.r.srem(keys.REQUEUED, job_id)

    # ---- turns at shared chores -----------------------------------------------------------------------------------
    def watchdog_lock(self, lease_s: float) -> LeaseLock:
        """The lease of the watchdog: one worker at a time runs it."""
        return LeaseLock(self.r, keys.WATCHDOG, lease_s=lease_s)

    def claim_checkpoint_sweep(self, every_s: int) -> bool:
        """True for the one worker that sweeps expired checkpoints now; no other gets True within `every_s`."""
        return bool(self.r.set(keys.SWEEP_CHECKPOINTS, now(), nx=True, ex=every_s))
