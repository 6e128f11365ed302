"""A training loss that goes NaN or infinite fails the job (`non_finite_loss`) and registers no model: a feature cache
whose activations hold non-finite values (bit rot, a float16 overflow) trains to a NaN loss, which the loop reads once
per epoch; the job step records the failure and writes no model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.extraction import run_extraction
from services.jobs.pipeline import model_id_for, train_step
from services.jobs.progress import NullReporter
from services.spec import JobSpec
from services.training.fit import NonFiniteLoss
from services.training.job import train_job
from storage.artifacts import ArtifactStore
from storage.cache import FeatureCache
from storage.jobs import JobStore
from storage.settings import Settings


def _poisoned(settings: Settings, digits_root: Path, value: float) -> tuple[dict, str]:
    body = {"dataset": {"path": str(digits_root / "train")},
            "backbone": {"name": "test_vit", "pretrained": False, "image_size": 32},
            "method": {"name": "losa", "rank": 2, "layers": 2},
            "training": {"epochs": 2, "batch_size": 16}}  # fmt: skip
    key = run_extraction(JobSpec.model_validate(body), settings, NullReporter())["cache_key"]
    entry = FeatureCache(settings.cache_location).entry(key)
    for batch in range(-(-len(entry.labels()) // entry.meta["batch_size"])):
        start, stop = entry.batch_range(batch)
        acts = entry.read(np.arange(start, stop)).astype(np.float32)
        acts[:, :, 0, :] = value  # the class token of every image
        entry.write_batch(batch, acts, np.ones(stop - start, bool))
    return body, key


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_loss_fails_training(settings: Settings, digits_root: Path, value: float) -> None:
    body, key = _poisoned(settings, digits_root, value)
    with pytest.raises(NonFiniteLoss, match="training loss became nan in epoch 1") as info:
        train_job(JobSpec.model_validate(body), settings, key, NullReporter(), settings.data_path / "ckpt")
    assert info.value.code == "non_finite_loss"


def test_the_job_fails_non_finite_loss_and_registers_no_model(settings: Settings, digits_root: Path) -> None:
    body, key = _poisoned(settings, digits_root, float("nan"))
    store = JobStore.from_url(settings.broker_url)
    job = store.create_job(body)
    store.set_fields(job["id"], extracted=True, cache_key=key)
    train_step(store, settings, job["id"])
    record = store.get_job(job["id"])
    assert record["status"] == "failed" and record["error"]["code"] == "non_finite_loss", record["error"]
    assert not ArtifactStore.from_settings(settings).has_model(model_id_for(job["id"]))
    with pytest.raises(KeyError):
        store.get_model(model_id_for(job["id"]))
