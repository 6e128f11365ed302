"""The key layout in Redis: every key and key prefix sidetune writes, in one place (Celery's broker keys aside).

Only the owners in this package (storage/redis/) read or write these keys; the rest of the code goes through them.
docs/architecture.md ("State and its layout") describes the same table.
"""

from __future__ import annotations

from storage.quotas import owner_key

# ---- jobs (storage/redis/jobs.py) ----------------------------------------------------------------------------------
JOBS = "jobs"  # sorted set: every job id, scored by submission order
JOBS_SEQ = "jobs:seq"  # counter: the submission order
JOBS_STATUS_INDEXED = "jobs:status:indexed"  # set once the per-status sets hold the jobs recorded before they existed
JOBS_ACTIVE_INDEXED = "jobs:active:indexed"  # likewise for the owners' sets of unfinished jobs


def job(job_id: str) -> str:
    """A job's record (JSON)."""
    return f"job:{job_id}"


def jobs_with_status(status: str) -> str:
    """The set of job ids in `status` (what /metrics counts)."""
    return f"jobs:status:{status}"


def active_jobs(owner: str | None) -> str:
    """The sorted set of an owner's unfinished jobs, scored by submission order."""
    return f"jobs:active:{owner_key(owner)}"


def idempotency(owner: str | None, key_hash: str) -> str:
    """The job an owner's idempotency key (its hash) created."""
    return f"idem:{owner or '-'}:{key_hash}"


# ---- events (storage/redis/events.py) ------------------------------------------------------------------------------
def events(job_id: str) -> str:
    """A job's event log (a list of JSON events)."""
    return f"job:{job_id}:events"


# ---- models (storage/redis/models.py) ------------------------------------------------------------------------------
MODELS = "models"  # sorted set: model ids by creation time


def model(model_id: str) -> str:
    """A model's record (JSON)."""
    return f"model:{model_id}"


# ---- datasets (storage/redis/datasets.py) --------------------------------------------------------------------------
DATASETS = "datasets"  # sorted set: dataset ids by creation time


def dataset(dataset_id: str) -> str:
    """An uploaded dataset's record (JSON)."""
    return f"dataset:{dataset_id}"


def dataset_jobs(dataset_id: str) -> str:
    """The set of jobs that used a dataset."""
    return f"dataset:{dataset_id}:jobs"


# ---- usage (storage/redis/usage.py) --------------------------------------------------------------------------------
def usage(owner: str | None) -> str:
    """An owner's byte counters (a hash: uploads, artifacts)."""
    return f"usage:{owner_key(owner)}"


# ---- workers and their steps (storage/redis/workers.py) ------------------------------------------------------------
RUNNING = "running"  # set: jobs with a step in progress
REQUEUED = "requeued"  # set: jobs whose step the watchdog requeued, until a worker takes it up (or it fails)
SWEEP_CHECKPOINTS = "sweep:checkpoints"  # expiring claim: the worker that sweeps expired checkpoints this round
WATCHDOG = "watchdog"  # lease lock: the worker whose turn it is to run the watchdog


def worker(queue: str, name: str) -> str:
    """A worker's heartbeat (expires unless renewed)."""
    return f"worker:{queue}:{name}"


WORKERS = "worker:*"  # every heartbeat


def heartbeats_of(name: str) -> str:
    """The heartbeats of one worker, on any queue (a SCAN pattern)."""
    return f"worker:*:{name}"


def running(job_id: str) -> str:
    """The steps of a job in progress: a hash of worker -> step (JSON)."""
    return f"running:{job_id}"


def train_lock(job_id: str) -> str:
    """The lease of the worker training a job: one train step of a job runs at a time."""
    return f"train-lock:{job_id}"


# ---- the feature cache's leases (storage/redis/locks.py) -----------------------------------------------------------
CACHE_LOCK = "cache-lock:"  # + an entry's key: the lock of the job extracting it (its token is the job id)
CACHE_PIN = "cache-pin:"  # + an entry's key: a sorted set of the holders reading it, scored by expiry
CACHE_EVICTING = "cache-evicting:"  # + an entry's key: set while it is being evicted (new pins are refused)
CACHE_EVICT = "cache-evict"  # lease lock: the one evictor at a time

# ---- health ---------------------------------------------------------------------------------------------------------
HEALTH_WRITE = "health:write"  # a short-lived key /readyz writes to see whether Redis accepts writes
