"""The resolved job (services/jobs/resolved.py): the one budget rule the planner and the trainer share, the split
kept in the record or in the store, training on the recorded split (not one drawn again), and a job recorded
without a resolved job resolved by the worker."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from services.data.splits import split
from services.jobs import resolved as resolved_module
from services.jobs.pipeline import TRAIN_NEXT, extract_step, train_step
from services.jobs.planner import MIB, plan_job
from services.jobs.progress import NullReporter
from services.jobs.resolved import (
    GIB,
    SPLIT_FILE,
    ResolvedJob,
    ResolvedSplit,
    job_folder,
    memory_budgets,
    resolve,
    training_split,
)
from services.spec import JobSpec
from services.training.inputs import memory_budgets as training_budgets
from storage.redis import JobStore
from storage.settings import Settings
from storage.store import Store


def spec(digits: Path, **dataset) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"path": str(digits), **dataset},
            "backbone": {"name": "test_vit", "pretrained": False},
            "method": {"name": "linear"},
        }
    )


class Events(NullReporter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, dict | None]] = []

    def event(self, message: str, level: str = "info", type: str = "message", data: dict | None = None) -> None:
        self.seen.append((message, level, data))


# ---- the budget rule --------------------------------------------------------------------------------------------
def test_the_budget_rule_gives_each_split_half_of_each_budget(settings: Settings) -> None:
    capped = settings.model_copy(update={"train_memory_mb": 64})
    assert memory_budgets(capped).host_bytes == 32 * MIB  # half the cap (the cap is below half the RAM here)
    assert memory_budgets(capped).gpu_bytes is None  # no device known and no cap: the worker finds out
    assert memory_budgets(capped.model_copy(update={"gpu_cache_mb": 100})).gpu_bytes == 50 * MIB
    # a device: its free memory less a fifth of it (or 2 GiB, the larger), then halved; capped by the setting
    assert memory_budgets(capped, (20 * GIB, 40 * GIB)).gpu_bytes == 6 * GIB
    assert memory_budgets(capped, (3 * GIB, 8 * GIB)).gpu_bytes == GIB // 2
    assert memory_budgets(capped, (GIB, 8 * GIB)).gpu_bytes == 0
    assert memory_budgets(capped.model_copy(update={"gpu_cache_mb": 100}), (20 * GIB, 40 * GIB)).gpu_bytes == 50 * MIB
    assert memory_budgets(settings).host_bytes > 0  # uncapped: half of half the RAM available now


def test_the_planner_and_the_trainer_use_the_one_rule(settings: Settings, digits_root: Path) -> None:
    capped = settings.model_copy(update={"train_memory_mb": 64, "gpu_cache_mb": 10})
    p, resolved = plan_job(spec(digits_root / "train"), capped)
    assert p.train_memory_budget_bytes == resolved.budgets.host_bytes == 32 * MIB
    assert p.gpu_budget_bytes == resolved.budgets.gpu_bytes == 5 * MIB
    assert training_budgets(capped, "cpu") == (32 * MIB, 0)  # what each CacheSource of the splits gets


# ---- the split, recorded ----------------------------------------------------------------------------------------
def test_a_small_split_rides_in_the_record_and_a_large_one_in_the_store(
    settings: Settings, digits_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = spec(digits_root / "train", test_fraction=0.2)
    resolved, dataset = resolve(job, settings)
    drawn = split(dataset.labels, 0.2, 0.2, 0)
    assert (resolved.split.train, resolved.split.val, resolved.split.test) == tuple(map(len, drawn))
    assert resolved.split.codes is not None and resolved.split.file is None
    assert resolved.dataset_fingerprint == dataset.fingerprint and resolved.cached_token_mode == "cls"
    again = ResolvedJob.model_validate(resolved.record())  # as a worker reads the record
    assert again.split.load(None) is not None
    for got, want in zip(again.split.indices(dataset.labels, dataset.classes, job.dataset), drawn, strict=True):
        np.testing.assert_array_equal(got, want)

    monkeypatch.setattr(resolved_module, "INLINE_BYTES", 0)  # every split is "large" now
    large, _ = resolve(job, settings)
    assert large.split.codes is None and large.split.file == "split.bin"
    folder = Store(settings.artifacts_location).folder("jobs", "job_x")
    record = large.record()
    assert ResolvedJob.model_validate(record).split.load(folder) is None  # not written yet: drawn again and checked
    missing = ResolvedJob.model_validate(record)
    for got, want in zip(missing.split.indices(dataset.labels, dataset.classes, job.dataset), drawn, strict=True):
        np.testing.assert_array_equal(got, want)
    large.split.save(folder)
    assert folder.files() == {"split.bin": folder.files()["split.bin"]}
    stored = ResolvedJob.model_validate(record)
    assert stored.split.load(folder) is not None
    for got, want in zip(stored.split.indices(dataset.labels, dataset.classes, job.dataset), drawn, strict=True):
        np.testing.assert_array_equal(got, want)
    codes = bytearray(zlib.decompress(folder.read_bytes("split.bin")))
    codes[0] = (codes[0] + 1) % 3  # one image moved to another split
    folder.write_bytes("split.bin", zlib.compress(bytes(codes)))
    with pytest.raises(RuntimeError, match="damaged"):
        ResolvedJob.model_validate(record).split.load(folder)


def test_training_takes_the_recorded_split_less_the_images_it_cannot_use(settings: Settings, digits_root: Path) -> None:
    job = spec(digits_root / "train")
    resolved, dataset = resolve(job, settings)
    labels, classes = dataset.labels, dataset.classes
    other = split(labels, 0.2, 0.0, 7)  # a split the spec's seed would not draw: training must still take it
    resolved.split = ResolvedSplit.of(labels, other, job.dataset)
    events = Events()
    parts = training_split(resolved, job.dataset, labels, np.arange(len(labels)), classes, events)
    for got, want in zip(parts, other, strict=True):
        np.testing.assert_array_equal(got, want)
    ((message, _, data),) = events.seen
    assert "the planner's split" in message and data["split"]["parts_sha"] == resolved.split.parts_sha

    usable = np.setdiff1d(np.arange(len(labels)), [other[0][0], other[1][0]])  # two images not in the cache
    train, val, _ = training_split(resolved, job.dataset, labels, usable, classes, Events())
    np.testing.assert_array_equal(train, other[0][1:])
    np.testing.assert_array_equal(val, other[1][1:])

    changed = Events()  # labels other than those the split was drawn from: drawn again, and said so
    train, val, _ = training_split(resolved, job.dataset, labels[:-1], np.arange(len(labels) - 1), classes, changed)
    assert changed.seen[0][1] == "warning" and "drawn here" in changed.seen[1][0]
    assert len(train) + len(val) == len(labels) - 1


# ---- in the steps -----------------------------------------------------------------------------------------------
def split_event(store: JobStore, job_id: str) -> dict:
    (data,) = [e["data"]["split"] for e in store.events(job_id) if (e.get("data") or {}).get("split")]
    return data


def test_an_old_record_is_resolved_by_the_worker_and_a_recorded_split_is_the_one_trained(
    settings: Settings, digits_root: Path
) -> None:
    store = JobStore.from_url(settings.broker_url)
    job = spec(digits_root / "train", test_fraction=0.2)
    body = job.model_dump(mode="json")

    old = store.create_job(body)  # as recorded before resolved jobs existed
    assert store.get_job(old["id"])["resolved"] is None
    assert extract_step(store, settings, old["id"]) == TRAIN_NEXT
    record = store.get_job(old["id"])
    resolved = ResolvedJob.model_validate(record["resolved"])
    assert resolved.weights_hash and resolved.cached_layers and resolved.cached_token_mode == "cls"
    train_step(store, settings, old["id"])
    record = store.get_job(old["id"])
    assert record["status"] == "succeeded", record["error"]
    assert split_event(store, old["id"])["parts_sha"] == resolved.split.parts_sha
    assert record["metrics"]["test_images"] == resolved.split.test

    planned, dataset = resolve(job, settings)  # a record whose split is not the seed's: it is the one trained
    planned.split = ResolvedSplit.of(dataset.labels, split(dataset.labels, 0.2, 0.2, 11), job.dataset)
    assert planned.split.parts_sha != resolved.split.parts_sha
    new = store.create_job(body, resolved=planned.record())
    assert extract_step(store, settings, new["id"]) == TRAIN_NEXT  # the same cache entry: a hit
    train_step(store, settings, new["id"])
    record = store.get_job(new["id"])
    assert record["status"] == "succeeded", record["error"]
    assert split_event(store, new["id"]) == {
        "train": planned.split.train,
        "val": planned.split.val,
        "test": planned.split.test,
        "parts_sha": planned.split.parts_sha,
    }
    assert record["resolved"]["weights_hash"] == resolved.weights_hash
    # a small split: none in the store (the job folder holds only its TensorBoard events)
    assert SPLIT_FILE not in job_folder(settings, new["id"]).files()
