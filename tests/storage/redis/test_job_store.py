"""The job store as the rest of the code sees it: the owners it composes and hands out, and the rule that keeps Redis
inside storage/ (no module of api/, services/, worker/ or bench/ reaches a store's client or writes a key by name)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from storage.redis import JobStore, keys
from storage.redis.locks import acquire_or_wait

REPO = Path(__file__).resolve().parents[3]
OUTSIDE = ("api", "services", "worker", "bench")
# the prefixes of keys.py's names: a string starting with one outside storage/ is a raw key
KEY = re.compile(r"^(job|jobs|model|dataset|usage|idem|running|worker|cache-(lock|pin|evicting)|sweep|health):(?!\s)")


@pytest.fixture
def store(redis_url: str) -> JobStore:
    s = JobStore.from_url(redis_url.rsplit("/", 1)[0] + "/14")  # a database of its own
    s.r.flushdb()
    return s


def _offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(REPO)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "r":
            out.append(f"{where}:{node.lineno}: .r (the Redis client): use the store's owners")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and KEY.match(node.value):
            out.append(f"{where}:{node.lineno}: {node.value!r} (a Redis key): name it in storage/redis/keys.py")
    return out


def test_no_code_outside_storage_touches_the_redis_client_or_a_key() -> None:
    offences = [o for package in OUTSIDE for path in sorted((REPO / package).rglob("*.py")) for o in _offences(path)]
    assert not offences, "\n".join(offences)


def test_the_check_sees_a_client_and_a_key(tmp_path: Path) -> None:
    bad = REPO / "bench" / "_offence_probe.py"  # under the repository: the check names files relative to it
    bad.write_text('def f(store):\n    return store.r.get(f"job:{1}")\n')
    try:
        found = _offences(bad)
    finally:
        bad.unlink()
    assert len(found) == 2 and ".r (the Redis client)" in found[0] and "'job:'" in found[1]


def test_jobs_many_reads_records_in_order_with_none_for_missing(store: JobStore) -> None:
    a, b = store.create_job({"i": 0}), store.create_job({"i": 1})
    assert store.jobs_many([b["id"], "job_missing", a["id"]]) == [b, None, a]
    assert store.jobs_many([]) == []


def test_the_store_hands_out_the_cache_leases_under_the_layouts_names(store: JobStore) -> None:
    lock = store.extraction_lock("k1", "job_1")
    assert acquire_or_wait(lock, done=lambda: False)
    try:
        assert store.r.get(keys.CACHE_LOCK + "k1") == "job_1"
        assert store.pins().extracting("k1") == "job_1"
        assert store.extraction_lock("k1", "job_1").adopt()  # the job's shard tasks join it
        assert not store.extraction_lock("k1", "job_2").acquire()
    finally:
        lock.release()
    with store.pin("k1", holder="job_3") as pin:
        assert pin.held and store.pins().holders("k1") == ["job_3"]
        with store.pins() as pins:
            assert not pins.begin_eviction("k1")  # pinned: never evicted
    assert store.pins().holders("k1") == []


def test_usage_and_dataset_records_share_the_stores_connection(store: JobStore) -> None:
    store.usage.add("a", "uploads", 10)
    assert store.usage.get("a", "uploads") == 10 and store.r.hget(keys.usage("a"), "uploads") == "10"
    store.datasets.add({"id": "ds_1", "owner": "a"})
    assert store.datasets.get("ds_1")["owner"] == "a" and store.r.exists(keys.dataset("ds_1"))
