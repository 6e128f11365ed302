"""Checkpoint retention (services/jobs/retention.py): a finished job's checkpoint goes once its retention is over, a
deleted job's at once, a running job's never; sweeps are throttled across workers."""

from __future__ import annotations

from services.jobs.retention import expires_at, sweep_checkpoints
from storage.artifacts import ArtifactStore
from storage.redis import JobStore, now
from storage.settings import Settings


def test_sweep_removes_expired_and_orphaned_checkpoints_only(settings: Settings) -> None:
    store = JobStore.from_url(settings.broker_url)
    store.r.flushdb()
    artifacts = ArtifactStore.from_settings(settings)
    running = store.create_job({})
    store.set_fields(running["id"], status="training")
    recent, old = store.create_job({}), store.create_job({})
    store.set_fields(recent["id"], status="succeeded", finished_at=now() - 3600)
    store.set_fields(old["id"], status="failed", finished_at=now() - 25 * 3600)
    for job_id in (running["id"], recent["id"], old["id"], "job_deleted"):
        artifacts.checkpoints(job_id).write_json("checkpoint.json", {"epoch": 1})

    assert expires_at(store.get_job(running["id"]), settings) is None
    finished = store.get_job(recent["id"])["finished_at"]
    assert expires_at(store.get_job(recent["id"]), settings) == round(finished + 24 * 3600, 3)
    assert sorted(sweep_checkpoints(store, settings)) == sorted([old["id"], "job_deleted"])
    assert artifacts.checkpointed_jobs() == sorted([running["id"], recent["id"]])

    hourly = settings.model_copy(update={"checkpoint_retention_h": 0.5})
    assert sweep_checkpoints(store, hourly) == []  # another sweep ran within the last few minutes
    assert sweep_checkpoints(store, hourly, force=True) == [recent["id"]]
    assert artifacts.checkpointed_jobs() == [running["id"]]
