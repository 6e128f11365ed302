"""`load_trained`: the one way a trained model is rebuilt from its artifact (its manifest, services/models/manifest.py,
and its weights, safetensors), for the inference service (services/serving/inference.py) and every exporter
(services/export/). Torch.

- `read_artifact`: the manifest (migrated from any version) and the trained weights of a model in the store.
- `load_backbone_for`: the frozen backbone the manifest names; its weights must hash as the manifest says.
- `load_trained`: the model as one module, images -> logits. An adapted model (APLA, ARC, LoRA, full) is merged into
  the ViT; a side model (linear, LoSA) is `SideClassifier`: the frozen backbone tapped at the side network's layers,
  the tokens pooled as the cache held them, then the side network (the computation of `Predictor.run`, in one module
  that torch.onnx traces).

Whatever the backbone (loaded here, shared by the inference service, or handed in by an adapter's user), a model
never runs on other weights than it was trained on: `BackboneChanged`, the one error of every loader.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from services import methods
from services.backbones import Backbone, load_backbone, weights_hash
from services.methods.readout import FeatureInfo, Readout
from services.models.manifest import BackboneChanged, Manifest, migrate
from services.paths import UserPaths
from storage.cache import pool_tokens


@dataclass(frozen=True)
class Artifact:
    """A trained model as stored: its manifest and its weights."""

    model_id: str
    manifest: Manifest
    weights: dict[str, np.ndarray]  # what the method trained and its buffers, never the frozen backbone


def read_artifact(artifacts: Any, model_id: str) -> Artifact:
    """The model `model_id` of `artifacts` (storage.artifacts.ArtifactStore): FileNotFoundError for one never saved,
    storage.store.Incomplete for one that is not whole."""
    weights, config = artifacts.load_model(model_id)
    return Artifact(model_id, migrate(config), weights)


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
    """A rebuilt model: its artifact's manifest and weights, and the module, images [N, 3, H, W] (clips:
    [N, T*3, H, W]), normalised as `manifest.preprocessing` says -> logits [N, classes]."""

    model_id: str
    manifest: Manifest
    weights: dict[str, np.ndarray]
    module: nn.Module  # a merged ViT, or a SideClassifier

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.manifest.input_shape

    @property
    def side(self) -> nn.Module | None:
        """A side model's side network alone (it reads activations); None for an adapted model."""
        return self.module.side if isinstance(self.module, SideClassifier) else None


def check_weights(manifest: Manifest, found: str, what: str) -> None:
    """BackboneChanged unless `found` (a weights hash) is the one the model was trained on."""
    if found != manifest.weights_hash:
        raise BackboneChanged(
            f"{what} now has other weights than the model was trained on ({found} instead of {manifest.weights_hash})"
        )


def load_backbone_for(
    manifest: Manifest, paths: UserPaths | None, device: str = "cpu", precision: str = "fp32"
) -> Backbone:
    """The backbone the model was trained on, its weights checked. In the service (`paths`: the server's rule,
    services/paths.py) its checkpoint file is checked again before it is read: it may have moved into a service
    folder since training; outside it (an adapter loaded by its user, `paths` None) it is read where it is."""
    spec = manifest.backbone
    checkpoint = None
    if spec.checkpoint:
        checkpoint = paths.checkpoint(spec) if paths is not None else Path(spec.checkpoint).expanduser()
    backbone = load_backbone(spec, device, checkpoint, precision)
    check_weights(manifest, backbone.weights_hash, f"backbone {spec.name}")
    return backbone


def float32_copy(vit: nn.Module) -> nn.Module:
    """A copy of `vit` on the CPU in float32, `vit` untouched: its modules deep-copied, its tensors replaced by
    float32 copies through deepcopy's memo (never a second copy in its own dtype)."""
    memo: dict[int, Any] = {}
    for t in chain(vit.parameters(), vit.buffers()):
        cpu = t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype, copy=True)
        memo[id(t)] = nn.Parameter(cpu, requires_grad=False) if isinstance(t, nn.Parameter) else cpu
    return copy.deepcopy(vit, memo)


def _state(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}


def _side_network(manifest: Manifest, weights: dict[str, np.ndarray]) -> nn.Module:
    features = manifest.features.model_dump()
    readout = Readout.tensors_from_state(weights)
    info = FeatureInfo(**features, num_classes=len(manifest.classes), readout=readout)
    side = methods.build(manifest.method, info)
    side.load_trainable(_state(weights))
    return side.eval()


def _merged(manifest: Manifest, weights: dict[str, np.ndarray], vit: nn.Module) -> nn.Module:
    """The adapted model merged into `vit` (float32; changed in place): a plain ViT, one backbone forward."""
    adapted = methods.build(manifest.method, vit, len(manifest.classes), manifest.tail_blocks)
    adapted.load_trainable(_state(weights))
    return adapted.merge().eval().requires_grad_(False)


def load_trained(
    artifact: Artifact,
    paths: UserPaths | None = None,
    backbone: Backbone | nn.Module | None = None,
    shared: bool = False,
) -> Trained:
    """The model of `artifact` as one module in eval mode, images -> logits, on `backbone`: by default the one the
    manifest names, loaded in float32 on the CPU (`paths`: see `load_backbone_for`); else a loaded `Backbone`, or a
    timm ViT (for a video model a ViViT, as services/video/backbone.py builds it) whose weights are hashed here.
    Either way BackboneChanged when its weights are not the ones the model was trained on.

    Not `shared`, the backbone is the model's own: put in float32 and, for an adapted model, merged into in place.
    `shared` (the inference service's backbone, serving other models in its own dtype): left untouched, an adapted
    model merged into a float32 CPU copy of it."""
    manifest = artifact.manifest
    if backbone is None:
        backbone = load_backbone_for(manifest, paths)
    if isinstance(backbone, Backbone):
        vit, found, what = backbone.model, backbone.weights_hash, f"backbone {backbone.spec.name}"
    else:
        vit, found, what = backbone, weights_hash(backbone), f"this {manifest.backbone.name}"
    check_weights(manifest, found, what)
    if not shared:
        vit = vit.float().eval().requires_grad_(False)
    if manifest.kind == "side":
        side = _side_network(manifest, artifact.weights)
        module: nn.Module = SideClassifier(vit, side, manifest.input_layers, manifest.input_tokens).eval()
    else:
        module = _merged(manifest, artifact.weights, float32_copy(vit) if shared else vit)
    return Trained(artifact.model_id, manifest, artifact.weights, module)
