"""Training refuses to produce a model from a diverged run: a loss that goes NaN or infinite fails with
`non_finite_loss` (checked once per epoch), and the numbers that make runs diverge are refused at submission."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services import methods
from services.methods.linear import Config as LinearConfig
from services.methods.readout import FeatureInfo
from services.progress import NullReporter
from services.training import NonFiniteLoss, fit


class Features:
    """A source of ready feature batches [B, 1, T, D] (what a cache source yields), one feature set to `poison`."""

    def __init__(self, n: int, poison: float | None) -> None:
        rng = np.random.default_rng(0)
        self.x = torch.from_numpy(rng.normal(size=(n, 1, 5, 8)).astype(np.float32))
        self.y = torch.from_numpy(rng.integers(0, 3, n))
        if poison is not None:
            self.x[3, 0, 0, 1] = poison  # in the class token, which the probe reads

    def iterate(self, batches):
        for b in batches:
            yield self.x[torch.from_numpy(b)], self.y[torch.from_numpy(b)]


def _model():
    info = FeatureInfo(num_layers=2, tokens=5, dim=8, num_prefix_tokens=1, global_pool="token", norm_eps=1e-6,
                       num_classes=3, readout={})  # fmt: skip
    return methods.build(LinearConfig(), info)


HP = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0, "batch_size": 8, "epochs": 2, "warmup_epochs": 0,
      "seed": 0}  # fmt: skip


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_loss_fails_training_and_saves_nothing(tmp_path, poison) -> None:
    with pytest.raises(NonFiniteLoss, match="training loss became nan in epoch 1") as info:
        fit(_model(), Features(32, poison), Features(8, None), 32, 8, HP, NullReporter(), tmp_path / "ck", "cpu")
    assert info.value.code == "non_finite_loss"
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())  # no checkpoint of a NaN model


def test_a_finite_run_trains(tmp_path) -> None:
    best, metrics = fit(_model(), Features(32, None), Features(8, None), 32, 8, HP, NullReporter(), tmp_path / "ck",
                        "cpu")  # fmt: skip
    assert metrics["epochs"] == 2 and all(np.isfinite(v).all() for v in best.values())
