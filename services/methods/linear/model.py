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

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.readout(feats[:, -1].float()))


def build(config: LinearConfig, info: FeatureInfo) -> LinearProbe:
    return LinearProbe(config, info)
