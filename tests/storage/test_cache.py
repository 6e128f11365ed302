"""The Zarr feature cache: create, batch writes, resume, completion, reads of any rows and layers, keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from storage.cache import CacheEntry, CacheError, FeatureCache, _rows_per_chunk, cache_key, pool_tokens

N, L, T, D, BS = 10, 3, 4, 5, 4  # 3 batches: rows 0-3, 4-7, 8-9


@pytest.fixture
def acts() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N, L, T, D)).astype(np.float16)


def make_entry(path: Path, **overrides) -> CacheEntry:
    entry = CacheEntry(path)
    kwargs = dict(
        labels=np.arange(N) % 3,
        layers=list(range(L)),
        tokens="all",
        token_count=T,
        dim=D,
        batch_size=BS,
        meta={"backbone": "x", "num_prefix_tokens": 1},
    )
    entry.create(**{**kwargs, **overrides})
    return entry


def write(entry: CacheEntry, acts: np.ndarray, batch: int) -> None:
    start, stop = entry.batch_range(batch)
    entry.write_batch(batch, acts[start:stop], np.ones(stop - start, bool))


def test_create_records_meta_and_labels(tmp_path: Path) -> None:
    entry = CacheEntry(tmp_path / "k")
    assert not entry.exists
    assert not entry.is_complete
    with pytest.raises(CacheError):
        _ = entry.meta
    make_entry(tmp_path / "k")
    assert entry.exists
    assert not entry.is_complete
    meta = entry.meta
    assert meta["shape"] == [N, L, T, D]
    assert meta["batch_size"] == BS
    assert meta["codec"] == "none"
    assert meta["backbone"] == "x"
    np.testing.assert_array_equal(entry.labels(), np.arange(N) % 3)
    assert entry.labels().dtype == np.int64
    assert not entry.valid().any()
    assert entry.pending_batches() == [0, 1, 2]
    assert [entry.batch_range(b) for b in range(3)] == [(0, 4), (4, 8), (8, 10)]


def test_write_complete_and_read_all(tmp_path: Path, acts: np.ndarray) -> None:
    entry = make_entry(tmp_path / "k")
    for b in (2, 0, 1):  # any order
        write(entry, acts, b)
    assert entry.pending_batches() == []
    entry.mark_complete({"skipped": [], "bytes": 1})
    assert entry.is_complete
    assert entry.summary == {"skipped": [], "bytes": 1}
    out = entry.read()
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, acts)
    assert entry.valid().all()
    assert entry.nbytes() > 0


def test_read_unsorted_indices_and_layer_subset(tmp_path: Path, acts: np.ndarray) -> None:
    entry = make_entry(tmp_path / "k")
    for b in range(3):
        write(entry, acts, b)
    idx = np.array([7, 2, 9, 0, 5])
    np.testing.assert_array_equal(entry.read(idx), acts[idx])
    np.testing.assert_array_equal(entry.read(idx, [1]), acts[idx][:, [1]])
    np.testing.assert_array_equal(entry.read(idx, [2, 0]), acts[idx][:, [2, 0]])
    np.testing.assert_array_equal(entry.read(np.array([3, 3, 1]), [0, 2]), acts[[3, 3, 1]][:, [0, 2]])
    assert entry.read(idx, [2, 0]).shape == (5, 2, T, D)


def test_write_batch_with_wrong_row_count_is_refused(tmp_path: Path, acts: np.ndarray) -> None:
    entry = make_entry(tmp_path / "k")
    with pytest.raises(CacheError, match="batch 2 needs 2 rows, got 4"):
        entry.write_batch(2, acts[:4], np.ones(4, bool))
    assert entry.pending_batches() == [0, 1, 2]


def test_valid_flags_are_stored_per_row(tmp_path: Path, acts: np.ndarray) -> None:
    entry = make_entry(tmp_path / "k")
    entry.write_batch(0, acts[:4], np.array([True, False, True, True]))
    assert entry.valid()[:4].tolist() == [True, False, True, True]
    assert not entry.valid()[4:].any()  # unwritten rows are invalid


def test_resume_on_a_new_object_sees_only_missing_batches(tmp_path: Path, acts: np.ndarray) -> None:
    first = make_entry(tmp_path / "k")
    write(first, acts, 0)
    write(first, acts, 2)
    reopened = CacheEntry(tmp_path / "k")
    assert reopened.exists and not reopened.is_complete
    # create() with the same shape keeps the entry (and its data) so extraction can resume
    reopened.create(
        labels=np.arange(N) % 3,
        layers=list(range(L)),
        tokens="all",
        token_count=T,
        dim=D,
        batch_size=BS,
        meta={"backbone": "x"},
    )
    assert reopened.pending_batches() == [1]
    write(reopened, acts, 1)
    reopened.mark_complete({})
    np.testing.assert_array_equal(CacheEntry(tmp_path / "k").read(), acts)


def test_an_entry_whose_creation_was_killed_is_created_again(tmp_path: Path, acts: np.ndarray) -> None:
    """A worker SIGKILLed inside create() leaves the group and some arrays but no metadata (written last): the next
    create() makes the entry again instead of failing on the missing metadata, and readers get a CacheError."""
    import zarr

    half = CacheEntry(tmp_path / "k")
    half.fs.makedirs(half.root, exist_ok=True)
    zarr.open_group(str(tmp_path / "k" / "features.zarr"), mode="w").create_array("labels", data=np.arange(N))
    assert half.exists
    with pytest.raises(CacheError, match="never finished being created"):
        CacheEntry(tmp_path / "k").covers([0], "all")
    entry = make_entry(tmp_path / "k")
    assert entry.pending_batches() == [0, 1, 2]
    for b in range(3):
        write(entry, acts, b)
    entry.mark_complete({})
    np.testing.assert_array_equal(CacheEntry(tmp_path / "k").read(), acts)


def test_mark_complete_refuses_while_batches_missing(tmp_path: Path, acts: np.ndarray) -> None:
    entry = make_entry(tmp_path / "k")
    write(entry, acts, 0)
    with pytest.raises(CacheError, match="missing"):
        entry.mark_complete({})
    assert not entry.is_complete


@pytest.mark.parametrize(
    "change",
    [
        {"dim": D + 1},
        {"layers": list(range(L + 1))},
        {"token_count": T + 1},
        {"batch_size": BS + 1},
        {"labels": np.arange(N + 1)},
    ],
    ids=["dim", "layers", "tokens", "batch_size", "rows"],
)
def test_create_on_existing_entry_with_other_shape_raises(tmp_path: Path, change: dict) -> None:
    make_entry(tmp_path / "k")
    with pytest.raises(CacheError, match="another shape"):
        make_entry(tmp_path / "k", **change)


def test_unknown_codec_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="unknown codec"):
        make_entry(tmp_path / "k", codec="lz4")
    assert not CacheEntry(tmp_path / "k").exists


def test_zstd_codec_round_trip(tmp_path: Path, acts: np.ndarray) -> None:
    entry = make_entry(tmp_path / "k", codec="zstd")
    for b in range(3):
        write(entry, acts, b)
    assert entry.meta["codec"] == "zstd"
    np.testing.assert_array_equal(entry.read(np.array([9, 1]), [1]), acts[[9, 1]][:, [1]])


def test_readout_round_trip(tmp_path: Path) -> None:
    entry = make_entry(tmp_path / "k")
    tensors = {"norm.weight": np.arange(D, dtype=np.float32), "norm.bias": np.zeros(D, np.float32)}
    entry.save_readout(tensors)
    out = entry.readout()
    assert set(out) == set(tensors)
    np.testing.assert_array_equal(out["norm.weight"], tensors["norm.weight"])


def test_feature_cache_entry_and_remove(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    entry = cache.entry("abc")
    assert entry.path == tmp_path / "abc"
    make_entry(entry.path)
    assert cache.entry("abc").exists
    cache.remove("abc")
    assert not cache.entry("abc").exists
    cache.remove("abc")  # removing twice is fine


def test_cache_key_is_stable() -> None:
    parts = {"dataset": "fp", "backbone": "vit", "rows": 32, "preprocessing": {"mean": [0.5], "size": 224}}
    key = cache_key(parts)
    assert len(key) == 32
    assert all(c in "0123456789abcdef" for c in key)
    reordered = {"rows": 32, "preprocessing": {"size": 224, "mean": [0.5]}, "backbone": "vit", "dataset": "fp"}
    assert cache_key(reordered) == key
    assert cache_key(dict(parts)) == key
    assert cache_key({**parts, "rows": 64}) != key
    assert cache_key({**parts, "dataset": "fp2"}) != key


def fill(entry: CacheEntry, acts: np.ndarray) -> None:
    for b in range(3):
        write(entry, acts, b)
    entry.mark_complete({})


def test_one_shard_per_batch_and_chunks_of_about_a_mebibyte(tmp_path: Path, acts: np.ndarray) -> None:
    entry = make_entry(tmp_path / "k")
    fill(entry, acts)
    shard_files = [p for p in (entry.features / "acts" / "c").rglob("*") if p.is_file()]
    assert len(shard_files) == 3  # the write unit: one file per extraction batch, all layers inside
    assert _rows_per_chunk(32, 197 * 768 * 2) == 4  # ViT-B/16 all tokens: 4 rows x 1 layer = 1.2 MB per chunk
    assert _rows_per_chunk(32, 768 * 2) == 32  # pooled tokens: the whole shard is one chunk per layer
    assert _rows_per_chunk(6, 10**7) == 1


def test_layers_are_addressed_by_block_index(tmp_path: Path, acts: np.ndarray) -> None:
    entry = make_entry(tmp_path / "k", layers=[2, 5, 11])  # three cached blocks of a 12-block backbone
    fill(entry, acts)
    np.testing.assert_array_equal(entry.read([1, 0], [11, 2]), acts[[1, 0]][:, [2, 0]])
    with pytest.raises(CacheError, match="not \\[3\\]"):
        entry.read([0], [3])
    assert entry.covers([2, 11], "all") and entry.covers([11], "cls") and not entry.covers([3], "all")


def test_all_tokens_pool_to_cls_or_mean_on_read(tmp_path: Path, acts: np.ndarray) -> None:
    entry = make_entry(tmp_path / "k")
    fill(entry, acts)
    np.testing.assert_array_equal(entry.read([4], [1], "cls"), acts[[4]][:, [1], :1])
    expected = acts[[4]][:, [1], 1:].astype(np.float32).mean(axis=2, keepdims=True)
    np.testing.assert_allclose(entry.read([4], [1], "mean").astype(np.float32), expected, atol=2e-3)
    np.testing.assert_array_equal(pool_tokens(acts, "cls", 1), acts[:, :, :1])


def test_pooled_entry_holds_one_token_and_covers_only_its_mode(tmp_path: Path, acts: np.ndarray) -> None:
    entry = make_entry(tmp_path / "k", tokens="cls")
    assert entry.meta["shape"] == [N, L, 1, D]
    fill(entry, acts[:, :, :1])
    assert entry.covers([0], "cls") and not entry.covers([0], "mean") and not entry.covers([0], "all")
    with pytest.raises(CacheError, match="holds cls tokens"):
        entry.read([0], [0], "mean")


def test_find_picks_the_smallest_complete_covering_variant(tmp_path: Path, acts: np.ndarray) -> None:
    cache = FeatureCache(tmp_path)
    full = make_entry(tmp_path / "fam" / "full")
    fill(full, acts)
    small = make_entry(tmp_path / "fam" / "small", layers=[2], tokens="cls")
    fill(small, acts[:, 2:, :1])
    make_entry(tmp_path / "fam" / "incomplete", layers=[2], tokens="cls")  # never completed: ignored
    assert cache.find("fam", [2], "cls").key == "fam/small"
    assert cache.find("fam", [0, 2], "all").key == "fam/full"
    assert cache.find("fam", [2], "mean").key == "fam/full"  # pooled on read from all tokens
    assert cache.find("other", [2], "cls") is None
    assert {e.key for e in cache.entries()} == {"fam/full", "fam/small", "fam/incomplete"}


@pytest.mark.parametrize("codec", ["zstd", "blosc"])
def test_lossless_codecs_round_trip(tmp_path: Path, acts: np.ndarray, codec: str) -> None:
    entry = make_entry(tmp_path / "k", codec=codec)
    fill(entry, acts)
    np.testing.assert_array_equal(entry.read(), acts)


def test_bitround_is_lossy_within_its_kept_bits_and_smaller(tmp_path: Path) -> None:
    smooth = np.random.default_rng(1).standard_normal((N, L, 64, 64)).astype(np.float16)
    exact = make_entry(tmp_path / "exact", token_count=64, dim=64, codec="zstd")
    rounded = make_entry(tmp_path / "rounded", token_count=64, dim=64, codec="zstd", keepbits=4)
    for entry in (exact, rounded):
        fill(entry, smooth)
    got = rounded.read().astype(np.float32)
    rel = np.abs(got - smooth.astype(np.float32)) / np.maximum(np.abs(smooth.astype(np.float32)), 1e-3)
    assert rel.max() <= 2.0**-4  # 4 of 10 mantissa bits kept: relative error at most half a unit of the 4th bit
    assert rounded.nbytes() < 0.8 * exact.nbytes()


def test_touch_records_last_use(tmp_path: Path) -> None:
    entry = make_entry(tmp_path / "k")
    assert entry.last_used == 0.0
    entry.touch()
    assert entry.last_used > 0


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_cache_on_an_fsspec_url(tmp_path: Path, acts: np.ndarray, scheme: str) -> None:
    root = f"file://{tmp_path}/remote" if scheme == "file" else f"memory://sidetune-test-{tmp_path.name}"
    cache = FeatureCache(root)
    assert not cache.native  # zarr's FsspecStore, as for s3://
    entry = cache.entry("fam/v1")
    entry.create(
        labels=np.arange(N) % 3,
        layers=list(range(L)),
        tokens="all",
        token_count=T,
        dim=D,
        batch_size=BS,
        meta={"backbone": "x", "num_prefix_tokens": 1},
        codec="zstd",
    )
    entry.save_readout({"norm.weight": np.ones(D, np.float32)})
    fill(entry, acts)
    entry.touch()
    again = FeatureCache(root).find("fam", [1], "cls")
    assert again is not None and again.key == "fam/v1" and again.is_complete and again.last_used > 0
    np.testing.assert_array_equal(again.read([3, 1], [2, 0]), acts[[3, 1]][:, [2, 0]])
    np.testing.assert_array_equal(again.readout()["norm.weight"], np.ones(D, np.float32))
    assert again.nbytes() > 0 and cache.total_bytes() == again.nbytes()
    assert cache.evict(0) == ["fam/v1"] and cache.entries() == []
