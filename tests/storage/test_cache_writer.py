"""The parallel shard writer (storage/cache/writer.py): every batch lands whole and is marked done only after, the
buffers it was lent are always given back, and an error is raised, not lost, with the other writes finished."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from storage.cache import CacheEntry, CacheError, FeatureCache
from storage.cache.writer import ShardWriter

N, L, T, D, BS = 40, 2, 5, 8, 4  # 10 batches


def make_entry(root: str | Path, **kw) -> CacheEntry:
    entry = FeatureCache(root).entry("fam/var")
    entry.create(
        labels=np.arange(N) % 2,
        layers=list(range(L)),
        tokens="all",
        token_count=T,
        dim=D,
        batch_size=BS,
        meta={"num_prefix_tokens": 1},
        **kw,
    )
    return entry


@pytest.mark.parametrize("where", ["local", "memory"])
def test_every_batch_is_written_whole_and_marked_done(tmp_path: Path, where: str) -> None:
    entry = make_entry(tmp_path if where == "local" else f"memory://{tmp_path.name}")
    acts = np.random.default_rng(0).standard_normal((N, L, T, D)).astype(np.float16)
    given_back: list[int] = []
    lock = threading.Lock()
    with ShardWriter(entry, in_flight=3) as writer:
        assert writer.engine == ("tensorstore" if where == "local" else "zarr-python")
        for b in reversed(range(N // BS)):  # any order: each batch is its own shard
            start, stop = entry.batch_range(b)
            valid = np.arange(start, stop) != 5

            def give_back(b: int = b) -> None:
                with lock:
                    given_back.append(b)

            writer.submit(b, acts[start:stop], valid, done=give_back)
    assert sorted(given_back) == list(range(N // BS))
    assert entry.pending_batches() == []
    np.testing.assert_array_equal(entry.read(), acts)
    assert np.flatnonzero(~entry.valid()).tolist() == [5]


def test_a_failed_write_is_raised_and_its_batch_stays_pending(tmp_path: Path) -> None:
    entry = make_entry(tmp_path)
    acts = np.ones((BS, L, T, D), np.float16)
    given_back: list[int] = []
    writer = ShardWriter(entry, in_flight=2)
    writer.submit(0, acts, np.ones(BS, bool), done=lambda: given_back.append(0))
    writer.submit(1, acts[:3], np.ones(3, bool), done=lambda: given_back.append(1))  # 3 rows where 4 belong
    writer.submit(2, acts, np.ones(BS, bool), ready=lambda: given_back.append(-2), done=lambda: given_back.append(2))
    with pytest.raises(CacheError, match="batch 1 needs 4 rows, got 3"):
        writer.close()
    assert sorted(given_back) == [-2, 0, 1, 2]  # every lent buffer given back, the failing one too
    assert entry.pending_batches() == [1] + list(range(3, N // BS))
