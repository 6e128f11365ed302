"""A trained model as one module, images -> logits, in float32 on the CPU: what every export format writes out.

An adapted model (APLA, ARC, LoRA, full) is its merged timm ViT, as the inference service serves it. A side model
(linear, LoSA) is `SideClassifier`: the frozen backbone tapped at the side network's layers, the tokens pooled as the
cache held them, then the side network; the same computation as the inference service's `Predictor.run`, in one
module that torch.onnx can trace.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import TypeAdapter
from torch import nn

from services import methods
from services.backbones import Backbone, load_backbone
from services.methods.readout import FeatureInfo, Readout
from services.paths import UserPaths
from services.spec import BackboneSpec
from storage.cache import pool_tokens


class SideClassifier(nn.Module):
    """The frozen backbone and a side network (linear probe, LoSA) as one module: images -> logits."""

    def __init__(self, vit: nn.Module, side: nn.Module, layers: list[int], tokens: str) -> None:
        super().__init__()
        self.vit, self.side, self.layers, self.tokens = vit, side, list(layers), tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vit.forward_intermediates(
            x,
            indices=self.layers,
            norm=False,
            output_fmt="NLC",
            stop_early=True,
            intermediates_only=True,
            return_prefix_tokens=True,
        )
        # [B, L, T, D], prefix tokens first, as services.backbones.Backbone.intermediates lays the cache out
        feats = torch.stack([torch.cat([prefix, spatial], dim=1) for spatial, prefix in out], dim=1)
        return self.side(pool_tokens(feats, self.tokens, self.vit.num_prefix_tokens))


@dataclass
class Trained:
    model_id: str
    config: dict[str, Any]  # the artifact's config.json (services/training/job.py writes it)
    weights: dict[str, np.ndarray]  # the artifact's weights: what the method trained, never the frozen backbone
    backbone: Backbone  # float32, on the CPU; an adapted model's merged ViT is this backbone's model, changed
    module: nn.Module  # images [N, 3, H, W] (clips: [N, T*3, H, W]), normalised -> logits [N, classes]

    @property
    def classes(self) -> list[str]:
        return self.config["classes"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one input: 3 x frames channels for a clip (frames stacked along them)."""
        _, h, w = self.backbone.data_config["input_size"]
        video = self.config["backbone"].get("video")
        return (3 * video["num_frames"] if video else 3), h, w


def classifier(config: dict[str, Any], weights: dict[str, np.ndarray], vit: nn.Module) -> nn.Module:
    """The model of an artifact (config, weights) on the frozen backbone `vit` (float32) as one module, images ->
    logits. An adapted model is merged into `vit` in place."""
    method = TypeAdapter(methods.MethodConfig).validate_python(config["method"])
    state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
    if config.get("kind", "side") == "side":
        info = FeatureInfo(**config["feature_info"], readout=Readout.tensors_from_state(weights))
        side = methods.build(method, info)
        side.load_trainable(state)
        tokens = config.get("input_tokens") or "all"
        return SideClassifier(vit, side, config["input_layers"], tokens).eval()
    adapted = methods.build(method, vit, len(config["classes"]), config["tail_blocks"])
    adapted.load_trainable(state)
    return adapted.merge().eval().requires_grad_(False)


def frozen_backbone(config: dict[str, Any], paths: UserPaths | None = None, device: str = "cpu") -> Backbone:
    """The backbone the model was trained on, in float32; a ValueError if its weights are not the ones the model was
    trained on. In the service (`paths`: the server's rule, services/paths.py) its checkpoint file is checked again
    before it is read: it may have moved into a service folder since training; outside it (an adapter loaded by its
    user, `paths` None) it is read where it is."""
    spec = BackboneSpec.model_validate(config["backbone"])
    checkpoint = None
    if spec.checkpoint:
        checkpoint = paths.checkpoint(spec) if paths is not None else Path(spec.checkpoint).expanduser()
    backbone = load_backbone(spec, device, checkpoint, precision="fp32")
    if backbone.weights_hash != config["weights_hash"]:
        raise ValueError(
            f"backbone {spec.name} now has other weights than the model was trained on "
            f"({backbone.weights_hash} instead of {config['weights_hash']})"
        )
    return backbone


def trained_model(model_id: str, weights: dict[str, np.ndarray], config: dict[str, Any], paths: UserPaths) -> Trained:
    backbone = frozen_backbone(config, paths)
    return Trained(model_id, config, weights, backbone, classifier(config, weights, backbone.model))
