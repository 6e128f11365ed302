"""Everything sidetune keeps in Redis, one owner per concern: job records (jobs.py), their event logs (events.py), the
model registry (models.py), workers' heartbeats and running steps (workers.py), uploaded datasets' records
(datasets.py), byte counters per key (usage.py), the feature cache's leases (locks.py); every key is named in keys.py.
`JobStore` (store.py) composes them over one connection; the names most callers need are importable from here.
"""

from storage.redis.jobs import STATUSES, TERMINAL, Busy, IdempotencyConflict
from storage.redis.records import (
    DatasetRecord,
    Event,
    JobRecord,
    ModelRecord,
    NotFound,
    RunningStep,
    job_id_for,
    model_id_for,
    new_id,
    now,
)
from storage.redis.store import JobStore
from storage.redis.workers import worker_name

__all__ = [
    "STATUSES",
    "TERMINAL",
    "Busy",
    "DatasetRecord",
    "Event",
    "IdempotencyConflict",
    "JobRecord",
    "JobStore",
    "ModelRecord",
    "NotFound",
    "RunningStep",
    "job_id_for",
    "model_id_for",
    "new_id",
    "now",
    "worker_name",
]
