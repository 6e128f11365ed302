"""JobStore against a real Redis server: jobs, pagination, atomic updates, cancellation, events, models."""

from __future__ import annotations

import threading
import time

import pytest

from storage.redis import JobStore, NotFound


@pytest.fixture
def store(redis_url: str) -> JobStore:
    """A JobStore on an emptied database of its own (db 15: the session's Redis server is shared)."""
    s = JobStore.from_url(redis_url.rsplit("/", 1)[0] + "/15")
    s.r.flushdb()
    return s


def create_spaced(store: JobStore, n: int, **kwargs) -> list[dict]:
    """Create n jobs at least 2 ms apart, so their creation times (and list order) are distinct."""
    jobs = []
    for i in range(n):
        jobs.append(store.create_job({"i": i}, **kwargs))
        time.sleep(0.003)
    return jobs


def test_create_and_get(store: JobStore) -> None:
    job = store.create_job({"x": 1}, owner="alice")
    assert job["id"].startswith("job_")
    assert job["status"] == "queued"
    assert job["cancel_requested"] is False
    got = store.get_job(job["id"])
    assert got == job
    assert got["spec"] == {"x": 1}
    assert got["owner"] == "alice"


def test_get_missing_raises_not_found(store: JobStore) -> None:
    with pytest.raises(NotFound):
        store.get_job("job_doesnotexist")
    with pytest.raises(NotFound):
        store.update_job("job_doesnotexist", lambda j: None)
    with pytest.raises(KeyError):  # NotFound is a KeyError, so callers may catch either
        store.get_model("model_doesnotexist")


def test_list_newest_first_with_cursor(store: JobStore) -> None:
    ids = [j["id"] for j in create_spaced(store, 5)]
    newest_first = ids[::-1]
    assert [j["id"] for j in store.list_jobs(limit=10)] == newest_first
    page1 = store.list_jobs(limit=2)
    page2 = store.list_jobs(limit=2, after=page1[-1]["id"])
    page3 = store.list_jobs(limit=2, after=page2[-1]["id"])
    assert [j["id"] for j in page1 + page2 + page3] == newest_first
    assert len(page3) == 1
    assert store.list_jobs(limit=2, after=page3[-1]["id"]) == []
    with pytest.raises(NotFound):
        store.list_jobs(after="job_unknown")


def test_pagination_covers_every_job_once_even_within_one_millisecond(store: JobStore) -> None:
    ids = {store.create_job({"i": i})["id"] for i in range(23)}
    seen: list[str] = []
    after = None
    while page := store.list_jobs(limit=4, after=after):
        assert len(page) <= 4
        seen.extend(j["id"] for j in page)
        after = page[-1]["id"]
    assert len(seen) == len(set(seen)) == 23
    assert set(seen) == ids


def test_owner_filter_and_pagination(store: JobStore) -> None:
    jobs = []
    for i in range(7):
        jobs.append(store.create_job({"i": i}, owner="a" if i % 2 == 0 else "b"))
        time.sleep(0.003)
    a_ids = [j["id"] for j in jobs if j["owner"] == "a"][::-1]
    b_ids = [j["id"] for j in jobs if j["owner"] == "b"][::-1]
    assert [j["id"] for j in store.list_jobs(owner="a")] == a_ids
    assert [j["id"] for j in store.list_jobs(owner="b")] == b_ids
    first = store.list_jobs(limit=3, owner="a")
    rest = store.list_jobs(limit=3, after=first[-1]["id"], owner="a")
    assert [j["id"] for j in first + rest] == a_ids
    assert all(j["owner"] == "a" for j in first + rest)
    assert store.list_jobs(owner="nobody") == []


def test_update_job_edit_in_place_or_return_new(store: JobStore) -> None:
    job = store.create_job({})
    updated = store.update_job(job["id"], lambda j: j.update(status="extracting"))
    assert updated["status"] == "extracting"
    assert updated["updated_at"] >= job["updated_at"]
    replaced = store.update_job(job["id"], lambda j: {**j, "metrics": {"acc": 0.5}})
    assert replaced["metrics"] == {"acc": 0.5}
    stored = store.get_job(job["id"])
    assert stored["status"] == "extracting"
    assert stored["metrics"] == {"acc": 0.5}
    assert store.set_fields(job["id"], error={"code": "x"})["error"] == {"code": "x"}


def test_update_job_is_atomic_under_concurrent_writers(store: JobStore) -> None:
    job = store.create_job({})
    store.set_fields(job["id"], counter=0)

    def bump(j: dict) -> None:
        j["counter"] += 1

    def worker() -> None:
        for _ in range(25):
            store.update_job(job["id"], bump)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get_job(job["id"])["counter"] == 100  # no lost update


def test_cancel_queued_job_is_immediate(store: JobStore) -> None:
    job = store.create_job({})
    cancelled = store.request_cancel(job["id"])
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancel_requested"] is True
    assert store.get_job(job["id"])["status"] == "cancelled"
    events = store.events(job["id"])
    assert [(e["message"], e["level"]) for e in events] == [("cancelled", "warning")]


def test_cancel_running_job_sets_flag_only(store: JobStore) -> None:
    job = store.create_job({})
    store.set_fields(job["id"], status="training")
    assert store.cancel_requested(job["id"]) is False
    after = store.request_cancel(job["id"])
    assert after["status"] == "training"
    assert after["cancel_requested"] is True
    assert store.cancel_requested(job["id"]) is True
    assert store.events(job["id"]) == []


def test_cancel_finished_job_changes_nothing(store: JobStore) -> None:
    job = store.create_job({})
    store.set_fields(job["id"], status="succeeded")
    after = store.request_cancel(job["id"])
    assert after["status"] == "succeeded"
    assert after["cancel_requested"] is False
    assert store.events(job["id"]) == []


def test_events_sequence_and_after(store: JobStore) -> None:
    job = store.create_job({})
    seqs = [store.add_event(job["id"], f"m{i}", level="info" if i else "warning") for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    events = store.events(job["id"])
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert [e["message"] for e in events] == ["m0", "m1", "m2", "m3", "m4"]
    assert events[0]["level"] == "warning"
    tail = store.events(job["id"], after=3)
    assert [(e["seq"], e["message"]) for e in tail] == [(4, "m3"), (5, "m4")]
    assert [e["seq"] for e in store.events(job["id"], after=1, limit=2)] == [2, 3]
    assert store.events(job["id"], after=5) == []
    store.add_event(job["id"], "with data", type="metrics", data={"acc": 1.0})
    last = store.events(job["id"], after=5)[0]
    assert (last["type"], last["data"]) == ("metrics", {"acc": 1.0})


def test_models_register_get_list(store: JobStore) -> None:
    m1 = {"id": "model_1", "created_at": 100.0, "owner": "a", "name": "first"}
    m2 = {"id": "model_2", "created_at": 200.0, "owner": "b", "name": "second"}
    m3 = {"id": "model_3", "created_at": 300.0, "owner": "a", "name": "third"}
    for m in (m1, m2, m3):
        assert store.register_model(m) == m
    assert store.get_model("model_2") == m2
    assert [m["id"] for m in store.list_models()] == ["model_3", "model_2", "model_1"]
    assert [m["id"] for m in store.list_models(owner="a")] == ["model_3", "model_1"]
    assert [m["id"] for m in store.list_models(limit=1)] == ["model_3"]
    with pytest.raises(NotFound):
        store.get_model("model_4")


def test_empty_store(store: JobStore) -> None:
    assert store.ping() is True
    assert store.list_jobs() == []
    assert store.list_models() == []


def test_cancel_twice_logs_one_event(store: JobStore) -> None:
    job = store.create_job({})
    store.request_cancel(job["id"])
    store.request_cancel(job["id"])
    assert [e["message"] for e in store.events(job["id"])] == ["cancelled"]


def test_newest_first_even_within_one_millisecond(store: JobStore) -> None:
    ids = [store.create_job({})["id"] for _ in range(50)]
    assert [j["id"] for j in store.list_jobs(limit=50)] == ids[::-1]
