"""Retention: a finished job's checkpoint stays on the store for `checkpoint_retention_h` after the job ended (`GET
/jobs/{id}/checkpoints` lists it and says when it goes), then this sweep removes it; so does it for the checkpoints
of jobs that no longer exist. The workers' watchdog pass runs it (services/jobs/watchdog.py), at most once every
`EVERY_S` across all workers (a Redis key with that expiry decides who), so the store is listed rarely.
"""

from __future__ import annotations

from storage.artifacts import ArtifactStore
from storage.redis import TERMINAL, JobRecord, JobStore, NotFound, now
from storage.settings import Settings

EVERY_S = 300


def expires_at(job: JobRecord, settings: Settings) -> float | None:
    """When a job's checkpoint is removed: its end plus the retention; None while it runs."""
    if job["status"] not in TERMINAL:
        return None
    ended = job.get("finished_at") or job["updated_at"]
    return round(ended + settings.checkpoint_retention_h * 3600, 3)


def sweep_checkpoints(store: JobStore, settings: Settings, force: bool = False) -> list[str]:
    """Remove expired checkpoints (unless another worker swept within EVERY_S and not `force`); returns the job ids
    whose checkpoints went."""
    if not force and not store.workers.claim_checkpoint_sweep(EVERY_S):
        return []
    artifacts, removed = ArtifactStore.from_settings(settings), []
    for job_id in artifacts.checkpointed_jobs():
        try:
            expiry = expires_at(store.get_job(job_id), settings)
        except NotFound:  # deleted: nothing will ever list its checkpoint
            expiry = 0.0
        if expiry is not None and expiry <= now():
            artifacts.drop_checkpoints(job_id)
            removed.append(job_id)
    return removed
