"""Linear probe module: frozen norm and pooling on the last cached layer, then a trainable Linear."""

from __future__ import annotations

import torch
from torch import nn

from services.methods.linear.config import LinearConfig
from services.methods.readout import Classifier, FeatureInfo, Readout


class LinearProbe(Classifier):
    def __init__(self, config: LinearConfig, info: FeatureInfo) -> None:
        super().__init__()
        self.input_layers = [info.num_layers - 1]
        self.readout = Readout(info, config.pool)
        self.head = nn.Linear(info.dim, info.num_classes)

    def features(self, feats: torch.Tensor) -> torch.Tensor:
        """What the head reads: the frozen readout of the last cached layer, [B, D]."""
        return self.readout(feats[:, -1].float())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(feats))

    def forward_stacked(self, params: dict[str, torch.Tensor], feats: torch.Tensor) -> torch.Tensor:
        """K heads at once (a sweep, services/training/sweeps/): `params` "head.weight" [K, C, D] and "head.bias"
        [K, C]; returns logits [K, B, C]. The frozen features are computed once and the K heads applied as one matrix
        product [B, D] x [D, K C]."""
        w, b = params["head.weight"], params["head.bias"]
        with torch.no_grad():
            features = self.features(feats)
        logits = torch.addmm(b.flatten(), features, w.flatten(0, 1).t())  # [B, K C]
        return logits.view(len(features), *b.shape).transpose(0, 1)


def build(config: LinearConfig, info: FeatureInfo) -> LinearProbe:
    return LinearProbe(config, info)
