"""The job steps against a real Redis, without Celery: a sharded extraction (shard tasks run in any order,
the last one completes the entry and hands the job to training), equal to an extraction in one process."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from services.extraction import run_extraction
from services.jobs.pipeline import TRAIN_NEXT, extract_shard_step, extract_step, train_step
from services.jobs.progress import NullReporter
from services.spec import JobSpec
from storage.cache import FeatureCache
from storage.redis import JobStore, keys
from storage.settings import Settings


def spec_dict(digits: Path, **extraction) -> dict:
    return {
        "dataset": {"path": str(digits)},
        "backbone": {"name": "test_vit", "pretrained": False},
        "method": {"name": "losa", "rank": 4, "layers": 2},
        "extraction": {"batch_size": 32, **extraction},
        "training": {"epochs": 1},
    }


@pytest.mark.parametrize("where", ["local", "fsspec"])
def test_sharded_extraction_equals_one_process_and_trains(
    settings: Settings, digits_root: Path, tmp_path: Path, where: str
) -> None:
    if where == "fsspec":  # a shared store every extract worker reaches by URL, as s3:// would be
        settings = settings.model_copy(update={"cache_url": f"file://{tmp_path}/shared-cache"})
    store = JobStore.from_url(settings.broker_url)
    digits = digits_root / "train"
    job = store.create_job(spec_dict(digits, shards=3))

    assert extract_step(store, settings, job["id"]) == ("shards", 3)
    record = store.get_job(job["id"])
    assert record["status"] == "extracting" and not record.get("extracted")
    # shards run in any order on any worker; only the one that finds every batch written finishes
    assert extract_shard_step(store, settings, job["id"], 2, 3) is None
    assert extract_shard_step(store, settings, job["id"], 0, 3) is None
    assert extract_shard_step(store, settings, job["id"], 1, 3) == TRAIN_NEXT
    assert extract_shard_step(store, settings, job["id"], 1, 3) is None  # a redelivered shard: nothing to do
    record = store.get_job(job["id"])
    assert record["extracted"] and record["cache_key"] == record["extract_key"]
    n = record["metrics"]["images"]
    assert record["metrics"]["backbone_forwards"] == -(-n // 32)
    assert sum("shard" in e["message"] for e in store.events(job["id"])) >= 3

    sharded = FeatureCache(settings.cache_location).entry(record["cache_key"])
    assert sharded.native == (where == "local")
    clean = Settings(data_dir=settings.data_dir / "clean", allowed_roots=settings.allowed_roots)
    spec = JobSpec.model_validate(spec_dict(digits, shards=1))
    single = FeatureCache(clean.cache_dir).entry(run_extraction(spec, clean, NullReporter())["cache_key"])
    np.testing.assert_array_equal(sharded.read(), single.read())

    train_step(store, settings, job["id"])
    assert store.get_job(job["id"])["status"] == "succeeded"


def test_redelivered_extract_step_is_idempotent(settings: Settings, digits_root: Path) -> None:
    store = JobStore.from_url(settings.broker_url)
    job = store.create_job(spec_dict(digits_root / "train", shards=1))
    assert extract_step(store, settings, job["id"]) == TRAIN_NEXT
    assert extract_step(store, settings, job["id"]) is None  # extracted already: nothing is enqueued twice
    images = store.create_job({**spec_dict(digits_root / "train"), "method": {"name": "full"}})
    assert extract_step(store, settings, images["id"]) == TRAIN_NEXT  # images mode: no cache at all
    assert store.get_job(images["id"])["extracted"] is True


def test_concurrent_jobs_on_one_cache_entry_extract_it_once(settings: Settings, digits_root: Path) -> None:
    store = JobStore.from_url(settings.broker_url)
    body = spec_dict(digits_root / "train", shards=1)
    body["backbone"]["image_size"] = 64  # a family of its own in this Redis
    first, second = store.create_job(body), store.create_job(body)
    results: dict[str, object] = {}
    runner = threading.Thread(target=lambda: results.update(a=extract_step(store, settings, first["id"])))
    runner.start()
    deadline = time.monotonic() + 60
    while not list(store.r.scan_iter(keys.CACHE_LOCK + "*")) and time.monotonic() < deadline:
        time.sleep(0.01)  # the first job holds the entry's lock: the second must wait for it
    results["b"] = extract_step(store, settings, second["id"])
    runner.join()
    assert results == {"a": TRAIN_NEXT, "b": TRAIN_NEXT}
    a, b = store.get_job(first["id"]), store.get_job(second["id"])
    assert a["metrics"]["backbone_forwards"] > 0 and b["metrics"]["backbone_forwards"] == 0
    assert b["metrics"]["cache_hit"] is True and a["cache_key"] == b["cache_key"]
    # the demo reads these from both kinds of extraction step
    assert {"extract_seconds", "images", "bytes_per_image"} <= set(a["metrics"]) & set(b["metrics"])
    assert any("waiting for it" in e["message"] for e in store.events(second["id"]))


def test_quota_evicts_the_least_recently_used_entry_but_never_a_pinned_one(
    settings: Settings, digits_root: Path
) -> None:
    store = JobStore.from_url(settings.broker_url)
    cache = FeatureCache(settings.cache_dir)

    def extract(image_size: int, quota_gb: float | None) -> dict:
        body = spec_dict(digits_root / "train", shards=1)
        body["method"] = {"name": "linear"}  # one pooled token per image: small entries
        body["backbone"]["image_size"] = image_size
        job = store.create_job(body)
        extract_step(store, settings.model_copy(update={"cache_quota_gb": quota_gb}), job["id"])
        return store.get_job(job["id"])

    old = extract(48, None)
    size = cache.entry(old["cache_key"]).nbytes()
    with store.pin(old["cache_key"], holder="a-reader"):
        pinned = extract(64, 1.5 * size / 1e9)  # room for one entry only, but the old one is in use
    assert cache.entry(old["cache_key"]).is_complete
    newer = extract(80, 1.5 * size / 1e9)  # now the two older entries are evictable, least recently used first
    assert not cache.entry(old["cache_key"]).exists and not cache.entry(pinned["cache_key"]).exists
    assert cache.entry(newer["cache_key"]).is_complete
    assert any("evicted 2 least recently used" in e["message"] for e in store.events(newer["id"]))
