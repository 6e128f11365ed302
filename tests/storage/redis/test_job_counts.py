"""Jobs by status (what /metrics reports): counted from per-status sets kept in the record's own transaction, and
filled once for jobs recorded before the sets existed."""

from __future__ import annotations

import pytest

from storage.redis import JobStore, keys


@pytest.fixture
def store(redis_url: str) -> JobStore:
    store = JobStore.from_url(redis_url.rsplit("/", 1)[0] + "/9")  # a database of its own: exact counts
    store.r.flushdb()
    return store


def test_counts_follow_status_changes(store):
    a, b = store.create_job({}), store.create_job({})
    store.set_fields(a["id"], status="extracting")
    store.set_fields(a["id"], status="training")
    store.request_cancel(b["id"])  # queued: cancelled at once
    counts = store.count_by_status()
    assert counts == {
        "planning": 0,  # a status since plans run in the workers: counted like the others
        "queued": 0,
        "extracting": 0,
        "training": 1,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 1,
    }
    c = store.create_job({}, status="planning")
    assert store.count_by_status()["planning"] == 1 and store.job_ids_with_status("planning") == [c["id"]]
    assert store.request_cancel(c["id"])["status"] == "cancelled"  # planning: cancelled at once, as queued
    assert store.count_by_status()["planning"] == 0 and store.count_by_status()["cancelled"] == 2
    store.set_fields(a["id"], progress={"stage": "training"})  # no status change: no change in the counts
    assert store.count_by_status()["training"] == 1
    assert store.job_ids_with_status("training") == [a["id"]]


def test_jobs_recorded_before_the_sets_are_indexed_once(store):
    jobs = [store.create_job({}) for _ in range(3)]
    store.set_fields(jobs[0]["id"], status="succeeded")
    store.r.delete(*(keys.jobs_with_status(s) for s in ("queued", "succeeded")))  # as an older version left them
    assert store.count_by_status()["queued"] == 2 and store.count_by_status()["succeeded"] == 1
    assert store.r.exists(keys.JOBS_STATUS_INDEXED)
