"""A training loss that goes NaN or infinite fails the job (`non_finite_loss`) and registers no model: a feature cache
whose activations hold non-finite values (bit rot, a float16 overflow) trains to a NaN loss, which the loop reads once
per epoch; the job step records the failure and writes no model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from services.extraction import run_extraction
from services.jobs.pipeline import model_id_for, train_step
from services.jobs.progress import NullReporter
from services.methods.readout import Classifier
from services.spec import Hyperparameters, JobSpec
from services.training.evaluation import validation_scores
from services.training.fit import NonFiniteLoss, fit, select
from services.training.job import train_job
from services.training.objectives import Objective
from services.training.runs import ModuleRuns
from storage.artifacts import ArtifactStore
from storage.cache import FeatureCache
from storage.redis import JobStore
from storage.settings import Settings


def _poisoned(settings: Settings, digits_root: Path, value: float) -> tuple[dict, str]:
    body = {
        "dataset": {"path": str(digits_root / "train")},
        "backbone": {"name": "test_vit", "pretrained": False, "image_size": 32},
        "method": {"name": "losa", "rank": 2, "layers": 2},
        "training": {"epochs": 2, "batch_size": 16},
    }
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


class _Head(Classifier):
    """A linear classifier of 4 features (a side method's interface, no cache behind it)."""

    input_layers = None

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class _Arrays:
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def iterate(self, batches):
        for b in batches:
            yield torch.from_numpy(self.x[b]), torch.from_numpy(self.y[b])


def test_a_diverged_configuration_of_a_sweep_is_never_selected(tmp_path: Path) -> None:
    """One of two configurations diverges (NaN weights) while the other trains. NaN logits argmax to class 0, which
    is 80% of this validation split: scored as they come they would beat the honest configuration. They score NaN,
    the diverged configuration keeps its last finite weights, and the other is selected."""
    rng = np.random.default_rng(0)

    def arrays(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = (rng.random(n) < 0.2).astype(np.int64)
        return (100 * (rng.normal(size=(n, 4)) + 0.3 * y[:, None])).astype(np.float32), y

    (xt, yt), (xv, yv) = arrays(400), arrays(200)
    objective = Objective(yt, 2)
    hp = Hyperparameters(
        batch_size=32,
        epochs=3,
        warmup_epochs=0.0,
        seed=0,
        optimizer="sgd",
        weight_decay=0.0,
        clip_grad_norm=None,
        lr=1e-3,
    )
    torch.manual_seed(0)
    runs = [
        ModuleRuns(_Head(), hp, objective, "cpu"),
        ModuleRuns(_Head(), hp.model_copy(update={"lr": 1e36}), objective, "cpu"),
    ]
    reporter = NullReporter()
    results, _ = fit(
        runs, [(0, 0), (1, 0)], _Arrays(xt, yt), _Arrays(xv, yv), 400, 200, hp, objective, reporter, tmp_path / "ckpt"
    )
    assert any("1 of 2 configurations diverged" in e["message"] for e in reporter.events)
    assert select(results) == 0
    assert all(np.isfinite(v).all() for r in results for v in r.state.values())
    assert math.isnan(results[1].history[-1]["val_accuracy"])  # its curve says what happened
    share = float(np.mean(yv == 0))  # what "always class 0" scores
    nan_scores, zeros = np.full((200, 2), np.nan), np.zeros((200, 2))
    assert validation_scores(yv, [nan_scores, zeros])[1] == share and math.isnan(validation_scores(yv, [nan_scores])[0])
    tags = (rng.random((200, 3)) > 0.5).astype(int)  # multi-label: mAP of NaN scores would raise in scikit-learn
    assert math.isnan(validation_scores(tags, [np.full((200, 3), np.nan), rng.normal(size=(200, 3))])[0])
