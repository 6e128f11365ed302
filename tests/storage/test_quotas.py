"""Per-key quotas in the job store and the usage counters, on a real Redis: concurrent submissions and uploads never
pass a quota together, a key's queue position counts its own unfinished jobs only, models count once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from storage.quotas import ARTIFACTS, UPLOADS, QuotaExceeded, TooManyJobs
from storage.redis import JobStore, keys


@pytest.fixture
def store(redis_url: str) -> JobStore:
    store = JobStore.from_url(redis_url.rsplit("/", 1)[0] + "/10")  # a database of its own: exact counts
    store.r.flushdb()
    return store


def test_forty_concurrent_submissions_never_pass_the_jobs_quota(store: JobStore) -> None:
    def submit(_: int) -> str:
        try:
            return store.create_job({}, owner="a", limit=5)["id"]
        except TooManyJobs as e:
            return str(e)

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(submit, range(40)))
    admitted = [r for r in results if r.startswith("job_")]
    assert len(admitted) == 5
    assert store.active_jobs("a") == 5 and len(store.list_jobs(limit=100)) == 5
    refusal = next(r for r in results if not r.startswith("job_"))
    assert "jobs quota" in refusal and "5 jobs queued or running" in refusal and "SIDETUNE_KEY_QUOTA_JOBS" in refusal
    assert TooManyJobs.retry_after_s > 0

    assert store.create_job({}, owner="b", limit=5)  # another key has a quota of its own
    store.set_fields(admitted[0], status="extracting")  # running still counts
    with pytest.raises(TooManyJobs):
        store.create_job({}, owner="a", limit=5)
    store.set_fields(admitted[0], status="succeeded")  # finished: a place frees up
    assert store.create_job({}, owner="a", limit=5)
    store.request_cancel(admitted[1])  # cancelled while queued: so does another
    assert store.active_jobs("a") == 4


def test_a_refused_idempotent_submission_can_be_retried_with_its_key(store: JobStore) -> None:
    first = store.create_job({}, owner="a", limit=1)
    with pytest.raises(TooManyJobs):
        store.create_job_once("retry-me", {"x": 1}, owner="a", limit=1)
    store.set_fields(first["id"], status="failed")
    job, created = store.create_job_once("retry-me", {"x": 1}, owner="a", limit=1)
    assert created and store.get_job(job["id"])["status"] == "queued"


def test_queue_position_counts_only_the_owners_unfinished_jobs_before(store: JobStore) -> None:
    a1, a2, b1, a3 = (store.create_job({}, owner=o) for o in ("a", "a", "b", "a"))
    assert [store.queue_position(j["id"]) for j in (a1, a2, b1, a3)] == [0, 1, 0, 2]
    store.set_fields(a1["id"], status="succeeded")
    assert [store.queue_position(j["id"]) for j in (a2, b1, a3)] == [0, 0, 1]
    none = store.create_job({})  # the open API (no keys): one owner of its own
    assert store.queue_position(none["id"]) == 0 and store.active_jobs(None) == 1


def test_unfinished_jobs_recorded_before_the_sets_existed_are_indexed_once(store: JobStore) -> None:
    jobs = [store.create_job({}, owner="a") for _ in range(3)]
    store.set_fields(jobs[0]["id"], status="succeeded")
    store.r.delete(keys.active_jobs("a"), keys.JOBS_ACTIVE_INDEXED)  # as an older version left them
    fresh = JobStore(store.r)
    assert fresh.active_jobs("a") == 2
    assert fresh.queue_position(jobs[2]["id"]) == 1


def test_concurrent_uploads_never_pass_the_bytes_quota(store: JobStore) -> None:
    usage = store.usage

    def upload(_: int) -> bool:
        try:
            usage.reserve("a", UPLOADS, 10, 55e-9, "SIDETUNE_KEY_QUOTA_UPLOADS_GB")  # 55 bytes
            return True
        except QuotaExceeded as e:
            assert "uploaded datasets quota" in str(e) and "SIDETUNE_KEY_QUOTA_UPLOADS_GB" in str(e)
            assert "this needs" in str(e)
            return False

    with ThreadPoolExecutor(40) as pool:
        assert sum(pool.map(upload, range(40))) == 5
    assert usage.get("a", UPLOADS) == 50 and usage.get("b", UPLOADS) == 0
    usage.add("a", UPLOADS, -10)
    usage.reserve("a", UPLOADS, 10, 55e-9, "SIDETUNE_KEY_QUOTA_UPLOADS_GB")


def test_a_model_counts_once_against_its_owner_and_is_given_back_on_delete(store: JobStore) -> None:
    model = {"id": "model_1", "owner": "a", "created_at": 1.0, "size_bytes": 1000}
    store.register_model(model)
    store.register_model(model)  # a repeated train step registers it again
    usage = store.usage
    assert usage.get("a", ARTIFACTS) == 1000
    reached = "models quota of this API key exceeded: 1,000 bytes in use of at most 1,000 bytes"
    with pytest.raises(QuotaExceeded, match=reached):
        usage.check("a", ARTIFACTS, 1e-6, "SIDETUNE_KEY_QUOTA_ARTIFACTS_GB")  # 1000 bytes: reached
    usage.check("a", ARTIFACTS, 2e-6, "SIDETUNE_KEY_QUOTA_ARTIFACTS_GB")
    store.delete_model("model_1")
    store.delete_model("model_1")
    assert usage.get("a", ARTIFACTS) == 0
