"""Eviction of least recently used cache entries under a quota: kept, pinned and incomplete entries stay,
removal is atomic for readers, and two evictors at once are safe. Real files, a real Redis for pins."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from storage.cache import CacheEntry, FeatureCache
from storage.redis.locks import Pin, Pins

N, L, T, D, BS = 10, 3, 4, 5, 4


def make(cache: FeatureCache, key: str, complete: bool = True) -> CacheEntry:
    """A small entry (as tests/storage/test_cache.py makes them), complete unless told otherwise."""
    entry = cache.entry(key)
    entry.create(
        labels=np.arange(N) % 3,
        layers=list(range(L)),
        tokens="all",
        token_count=T,
        dim=D,
        batch_size=BS,
        meta={"backbone": "x", "num_prefix_tokens": 1},
    )
    acts = np.random.default_rng(0).standard_normal((N, L, T, D)).astype(np.float16)
    for b in range(3):
        start, stop = entry.batch_range(b)
        entry.write_batch(b, acts[start:stop], np.ones(stop - start, bool))
    if complete:
        entry.mark_complete({})
    return entry


def touched_in_order(cache: FeatureCache, keys: list[str]) -> list[CacheEntry]:
    """Complete entries, used in the order of `keys` (the first is the least recently used)."""
    entries = [make(cache, k) for k in keys]
    for e in entries:
        e.touch()
        time.sleep(0.01)
    return entries


def sizes(cache: FeatureCache) -> dict[str, int]:
    return {e.key: e.nbytes() for e in cache.entries()}


def test_evicts_least_recently_used_down_to_the_quota(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    keys = ["f/a", "f/b", "g/c", "g/d"]
    entries = touched_in_order(cache, keys)
    entries[0].touch()  # a is now the most recently used: b, c are the two oldest
    size = sizes(cache)
    total = cache.total_bytes()
    assert total == sum(size.values())
    quota = total - size["f/b"] - size["g/c"]
    assert cache.evict(quota) == ["f/b", "g/c"]
    assert {e.key for e in cache.entries()} == {"f/a", "g/d"}
    assert cache.total_bytes() <= quota
    assert cache.evict(quota) == []  # fits already
    assert cache.evict(cache.total_bytes(), reserve=1) == ["g/d"]  # room for what is about to be written
    assert not list(tmp_path.glob(".trash-*"))


def test_kept_and_incomplete_entries_are_never_evicted(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    make(cache, "f/incomplete", complete=False)  # never touched, oldest of all
    touched_in_order(cache, ["f/kept", "f/a", "f/b"])
    assert cache.evict(0, keep={"f/kept"}) == ["f/a", "f/b"]  # the quota cannot be met: remove what may go
    assert {e.key for e in cache.entries()} == {"f/incomplete", "f/kept"}
    assert cache.entry("f/incomplete").pending_batches() == []


def test_never_touched_entries_count_as_used_when_completed(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    (old,) = touched_in_order(cache, ["f/old"])
    time.sleep(0.01)
    make(cache, "f/new")  # completed after old was last used, never read yet
    time.sleep(0.01)
    make(cache, "f/newer")
    assert cache.evict(cache.total_bytes() - 1) == ["f/old"]
    assert cache.evict(cache.total_bytes() - 1) == ["f/new"]


def test_leftover_trash_is_no_entry_and_is_purged(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    make(cache, "f/a")
    crashed = tmp_path / ".trash-deadbeef"
    make(FeatureCache(crashed), "x/y")  # an evictor died between its rename and its delete
    (tmp_path / "f" / ".trash-z").mkdir()
    assert [e.key for e in cache.entries()] == ["f/a"]
    assert [e.key for e in cache.family("f")] == ["f/a"]
    assert cache.evict(10**9) == []
    assert not crashed.exists()


def test_pinned_entries_are_skipped_and_free_after_unpin(tmp_path: Path, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    cache, tag = FeatureCache(tmp_path), uuid.uuid4().hex  # keys of this test's own: Redis is shared
    a, b = f"{tag}/a", f"{tag}/b"
    touched_in_order(cache, [a, b])
    pins = Pins(r)
    with Pin(r, a, "job") as pin:
        assert pin.held
        assert a in pins.pinned_keys()
        assert cache.evict(cache.total_bytes() - 1, guard=pins) == [b]
        assert cache.entry(a).is_complete
    assert cache.evict(0, guard=pins) == [a]
    with Pin(r, a) as pin:  # the eviction mark is gone: a rebuilt entry of that key can be pinned
        assert pin.held


@pytest.mark.parametrize("with_guard", [False, True])
def test_two_evictors_at_once_remove_each_entry_once(tmp_path: Path, redis_url: str, with_guard: bool) -> None:
    cache, tag = FeatureCache(tmp_path), uuid.uuid4().hex
    keys = [f"{tag}{i % 3}/{i:02d}" for i in range(12)]
    touched_in_order(cache, keys)
    size = sizes(cache)
    lru = [keys[0], *keys[2:]]  # least recently used first; keys[1] is kept
    quota = cache.total_bytes() - sum(size[k] for k in lru[:5])
    guard = Pins(redis.Redis.from_url(redis_url)) if with_guard else None
    barrier, results, errors = threading.Barrier(3), [], []

    def evict() -> None:
        barrier.wait()
        try:
            results.append(cache.evict(quota, keep={keys[1]}, guard=guard))
        except Exception as exc:
            errors.append(exc)

    def read() -> None:  # a reader that keeps looking entries up meanwhile never sees half of one
        barrier.wait()
        for _ in range(50):
            for fam in {k.split("/")[0] for k in keys}:
                try:
                    cache.find(fam, [0, 2], "all")
                except Exception as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=evict), threading.Thread(target=evict), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    removed = results[0] + results[1]
    assert len(removed) == len(set(removed))
    assert set(removed) == set(lru[: len(removed)])  # the least recently used first
    if with_guard:  # evictors take turns: exactly the five least recently used go
        assert len(removed) == 5
    assert cache.total_bytes() <= quota
    assert not list(tmp_path.glob(".trash-*"))


def test_a_keys_eviction_removes_only_entries_that_key_created(tmp_path: Path) -> None:
    """Each entry counts against the key that created it (keys that reuse it are its users); eviction for a key's
    quota weighs and removes that key's entries only, least recently used first, and never another key's."""
    cache = FeatureCache(tmp_path)
    a_old, b_old, a_new = touched_in_order(cache, ["f/a-old", "f/b-old", "g/a-new"])
    for entry, owner in ((a_old, "a"), (b_old, "b"), (a_new, "a")):
        assert entry.claim(owner, planned_bytes=1)
    assert not b_old.claim("a", planned_bytes=1)  # created already: the creator stays
    b_old.use("a")
    assert b_old.creator["owner"] == "b" and b_old.users == ["a", "b"]
    mine = a_old.nbytes() + a_new.nbytes()
    assert cache.owner_bytes("a") == (mine, mine) and cache.owner_bytes("b") == (b_old.nbytes(), b_old.nbytes())

    writing = cache.entry("h/a-writing")  # claimed, not yet written: counts at its planned size, not evictable
    assert writing.claim("a", planned_bytes=10**6)
    assert cache.owner_bytes("a") == (mine + 10**6, mine)

    assert cache.evict(10**6 + a_new.nbytes(), owner="a") == ["f/a-old"]
    assert cache.evict(0, owner="a") == ["g/a-new"]  # never b's, though it is older than both
    assert {e.key for e in cache.entries()} == {"f/b-old", "h/a-writing"}
    assert cache.owner_bytes("b") == (b_old.nbytes(), b_old.nbytes())
