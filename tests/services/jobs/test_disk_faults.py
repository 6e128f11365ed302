"""The job steps on a small real disk (a tmpfs holding the feature cache) against a real Redis: a failing `last_used`
write does not fail a job; without a quota the worker evicts what the plan promised to fit the free disk; a cache
that cannot fit fails `disk_full` before writing; the planner measures a local cache_url's own disk, and says that
an object store has no free-space figure."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services.extraction import run_extraction
from services.jobs.pipeline import TRAIN_NEXT, extract_step, train_step
from services.jobs.planner import plan
from services.jobs.progress import NullReporter
from services.spec import JobSpec
from storage.cache import FeatureCache
from storage.redis import JobStore
from storage.settings import Settings
from tests.disk import fill


def body(digits: Path, image_size: int) -> dict:
    """LoSA on 2 blocks, every token: 179 digits x 2 x ((size/16)^2 + 1) x 64 x 2 B (2.98 MB at 128 px, 4.63 MB
    at 160 px)."""
    return {
        "dataset": {"path": str(digits)},
        "method": {"name": "losa", "rank": 4, "layers": 2},
        "backbone": {"name": "test_vit", "pretrained": False, "image_size": image_size},
        "extraction": {"batch_size": 32},
        "training": {"epochs": 1},
    }


@pytest.fixture
def on_tmpfs(tmpfs, settings: Settings):
    def make(size_mb: int, url: str = "") -> tuple[Settings, Path]:
        disk = tmpfs(size_mb)
        return settings.model_copy(update={"cache_url": f"{url}{disk / 'cache'}", "device": "cpu"}), disk

    return make


def test_a_failing_last_used_write_does_not_fail_the_job(on_tmpfs, digits_root: Path) -> None:
    settings, disk = on_tmpfs(4)
    store = JobStore.from_url(settings.broker_url)
    spec = body(digits_root / "train", 128)
    run_extraction(JobSpec.model_validate(spec), settings, NullReporter())  # complete: the job below reuses it
    fill(disk)  # marking it as used now fails with ENOSPC (an internal_error before)
    job = store.create_job(spec)
    assert extract_step(store, settings, job["id"]) == TRAIN_NEXT, store.get_job(job["id"])["error"]
    train_step(store, settings, job["id"])  # the model goes to the store, on another disk
    record = store.get_job(job["id"])
    assert record["status"] == "succeeded" and record["metrics"]["cache_hit"] is True, record["error"]


def test_without_a_quota_the_worker_evicts_what_the_plan_promised(on_tmpfs, digits_root: Path) -> None:
    settings, disk = on_tmpfs(8)
    assert settings.cache_quota_gb is None
    store = JobStore.from_url(settings.broker_url)
    old = run_extraction(JobSpec.model_validate(body(digits_root / "train", 128)), settings, NullReporter())
    old_bytes = FeatureCache(settings.cache_location).entry(old["cache_key"]).nbytes()
    fill(disk, leave=2_500_000)  # 4.63 MB to write, 2.5 MB free: fits once the old entry (2.98 MB) goes
    spec = body(digits_root / "train", 160)

    promised = plan(JobSpec.model_validate(spec), settings)
    assert promised.free_disk_bytes == shutil.disk_usage(disk).free
    assert promised.fits and promised.evict_entries == 1 and promised.evict_bytes == old_bytes, promised.message
    assert "fits after evicting" in promised.message

    job = store.create_job(spec)
    assert extract_step(store, settings, job["id"]) == TRAIN_NEXT, store.get_job(job["id"])["error"]
    evicted = [e for e in store.events(job["id"]) if e["message"].startswith("evicted")]
    assert len(evicted) == 1 and evicted[0]["data"]["evicted"] == [old["cache_key"]], evicted
    entries = FeatureCache(settings.cache_location).entries()
    assert [e.key for e in entries] == [store.get_job(job["id"])["cache_key"]] and entries[0].is_complete


def test_a_cache_that_cannot_fit_the_disk_fails_disk_full_before_writing(on_tmpfs, digits_root: Path) -> None:
    settings, disk = on_tmpfs(2)
    store = JobStore.from_url(settings.broker_url)
    job = store.create_job(body(digits_root / "train", 128))
    assert extract_step(store, settings, job["id"]) is None
    error = store.get_job(job["id"])["error"]
    assert error["code"] == "disk_full", error
    assert f"no space left under {disk / 'cache'}" in error["message"] and "2.98 MB more needed" in error["message"]
    assert FeatureCache(settings.cache_location).entries() == []


@pytest.mark.parametrize("url", ["", "file://"])
def test_the_planner_measures_a_local_cache_url_on_its_own_disk(on_tmpfs, digits_root: Path, url: str) -> None:
    """A local SIDETUNE_CACHE_URL turned the check off before ("4611686018.43 GB free")."""
    settings, disk = on_tmpfs(2, url)
    p = plan(JobSpec.model_validate(body(digits_root / "train", 128)), settings)
    assert p.free_disk_bytes == shutil.disk_usage(disk).free and p.fits is False, p
    assert f"the disk under {disk / 'cache'} has 0.00 GB free" in p.message


def test_the_planner_says_an_object_store_has_no_free_space_figure(
    settings: Settings, s3_url: str, digits_root: Path
) -> None:
    s3 = settings.model_copy(update={"cache_url": f"{s3_url}/cache"})
    p = plan(JobSpec.model_validate(body(digits_root / "train", 128)), s3)
    assert p.free_disk_bytes is None and p.available_bytes is None and p.fits is True, p
    assert "which has no free-space figure" in p.message and "4611686018" not in p.message
