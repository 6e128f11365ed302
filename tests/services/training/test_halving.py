"""LoSA's automatic learning-rate grid and early termination (services/training/halving.py): the rule, the rungs,
stopped configurations never becoming the model, a resume across a rung, and the grid reproducible from the seed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from services.extraction import run_extraction
from services.jobs.progress import Cancelled, NullReporter
from services.spec import JobSpec
from services.training import halving
from services.training.job import train_job
from storage.settings import Settings
from tests.services.training.test_sweeps import CancelAtEpoch, untimed

BACKBONE = {"name": "test_vit", "pretrained": False}


def spec(path: Path | str = "x", sweep: dict | None = None, **training) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"path": str(path)},
            "backbone": BACKBONE,
            "method": {"name": "losa", "rank": 4},
            "extraction": {"batch_size": 32},
            "training": {"batch_size": 32, **training},
            **({"sweep": sweep} if sweep is not None else {}),
        }
    )


def test_the_automatic_grid_follows_the_batch_and_the_epochs_the_dataset() -> None:
    assert spec(batch_size=64).automatic_lrs() == [0.025, 0.05, 0.1, 0.2]
    assert spec(batch_size=16).automatic_lrs() == [0.0125, 0.025, 0.05, 0.1]
    assert spec(batch_size=4096).automatic_lrs() == [0.2, 0.4, 0.8, 1.6]
    # a learning rate given, or swept, is used as given: no automatic grid, no early termination
    assert spec(lr=0.05).automatic_lrs() is None and spec(lr=0.05).grid() is None
    swept = spec(sweep={"lr": [0.01, 0.1]})
    assert swept.automatic_lrs() is None and not swept.configurations()[0].training.early_termination
    # a swept rank with the automatic rates: both axes, early termination on
    both = spec(sweep={"rank": [2, 4]})
    assert both.grid().describe() == "4 lr x 2 rank = 8 configurations"
    assert all(c.training.early_termination is True for c in both.configurations())
    training, defaults = spec().training, spec().method.training_defaults()
    assert [training.auto_epochs(defaults, n) for n in (8, 80, 900, 3_000, 1_000_000)] == [100, 100, 34, 10, 10]
    linear = JobSpec.model_validate({**spec().model_dump(), "method": {"name": "linear", "solver": "sgd"}})
    assert (
        linear.automatic_lrs() is None and linear.training.resolved(linear.method.training_defaults(), 900).epochs == 10
    )


def test_rungs_and_losers() -> None:
    assert halving.rungs(34) == [8, 17] and halving.rungs(4) == [1, 2] and halving.rungs(2) == [1]
    assert halving.rungs(1) == []
    # the lower half stops: by figure, then loss, then order; a NaN figure ranks last
    figures = {0: (0.9, 0.3), 1: (0.95, 0.2), 2: (0.9, 0.1), 3: (math.nan, math.nan)}
    assert halving.losers(figures) == [0, 3]
    assert halving.losers({5: (0.1, 1.0)}) == [] and halving.losers({**figures, 4: (0.5, 0.1)}) == [3, 4]


@pytest.fixture(scope="module")
def cache(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, str]:
    data = tmp_path_factory.mktemp("halving_cache")
    settings = Settings(data_dir=data, allowed_roots=[digits_root], device="cpu")
    key = run_extraction(spec(digits_root / "train"), settings, NullReporter())["cache_key"]
    return settings, key


def test_stopped_configurations_never_become_the_model(
    cache: tuple[Settings, str], digits_root: Path, tmp_path: Path
) -> None:
    settings, key = cache
    reporter = NullReporter()
    out = train_job(spec(digits_root / "train", epochs=4), settings, key, reporter, tmp_path / "ckpt")
    m = out["metrics"]
    assert m["configurations"] == 4 and m["automatic_lr"]["lrs"] == [0.01768, 0.03536, 0.07071, 0.1414]
    # 4 -> 2 after epoch 1 -> 1 after epoch 2: 1 + 1 + 2 + 4 configuration-epochs of 16
    assert m["early_termination"] == {
        "rungs": [1, 2],
        "stopped": 3,
        "configuration_epochs": 8,
        "configuration_epochs_without": 16,
        "saved_fraction": 0.5,
    }
    stopped = [e for e in m["sweep"] if "stopped_after_epoch" in e]
    assert sorted(e["stopped_after_epoch"] for e in stopped) == [1, 1, 2]
    assert all(len(e["history"]) == e["stopped_after_epoch"] for e in stopped)
    survivor = next(e for e in m["sweep"] if "stopped_after_epoch" not in e)
    assert len(survivor["history"]) == 4 and m["selected"] == survivor["config"]
    assert out["manifest"].hyperparameters["lr"] == survivor["config"]["lr"]
    assert m["val_accuracy"] == survivor["val_accuracy"]
    assert any(
        "early termination after epoch 1: 2 of 4 configurations stopped" in e["message"] for e in reporter.events
    )


def test_a_stopped_configuration_that_led_is_not_the_model(
    cache: tuple[Settings, str], digits_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even where the stopping rule stops the leader (here a rule that stops the first configuration, a sound learning
    rate, at the one rung of 2 epochs, and keeps a far too large one that ends lower), the job's model is one that
    trained to the end."""
    settings, key = cache
    monkeypatch.setattr(halving, "losers", lambda figures: sorted(figures)[:1])
    job = spec(digits_root / "train", sweep={"lr": [0.05, 0.8]}, epochs=2, early_termination=True)
    out = train_job(job, settings, key, NullReporter(), tmp_path / "ckpt")
    m = out["metrics"]
    survivor = next(e for e in m["sweep"] if "stopped_after_epoch" not in e)
    assert m["selected"] == survivor["config"]
    assert max(e["val_accuracy"] for e in m["sweep"]) > survivor["val_accuracy"], "the leader was not stopped"


def test_a_resume_after_a_rung_trains_the_survivors_and_the_grid_is_reproducible(
    cache: tuple[Settings, str], digits_root: Path, tmp_path: Path
) -> None:
    settings, key = cache
    # two architectures (ranks), so a rung can stop a whole stacked set
    job = spec(digits_root / "train", sweep={"rank": [2, 4]}, epochs=4, seed=3)
    whole = train_job(job, settings, key, NullReporter(), tmp_path / "whole")
    again = train_job(job, settings, key, NullReporter(), tmp_path / "again")
    with pytest.raises(Cancelled):
        train_job(job, settings, key, CancelAtEpoch(3), tmp_path / "cut")  # checkpointed after both rungs
    reporter = NullReporter()
    resumed = train_job(job, settings, key, reporter, tmp_path / "cut")
    assert any("resumed training from the checkpoint of epoch 2" in e["message"] for e in reporter.events)
    assert whole["metrics"]["early_termination"]["stopped"] == 6
    for other in (again, resumed):
        assert other["metrics"]["selected"] == whole["metrics"]["selected"]
        for ours, theirs in zip(other["metrics"]["sweep"], whole["metrics"]["sweep"], strict=True):
            assert ours.get("stopped_after_epoch") == theirs.get("stopped_after_epoch")
            assert untimed(ours["history"]) == untimed(theirs["history"])
        for name, value in whole["weights"].items():
            np.testing.assert_allclose(other["weights"][name], value, rtol=1e-6, atol=1e-7)
