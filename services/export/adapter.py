"""Export as an adapter, in the spirit of PEFT's saved adapters: the trained weights alone
(`adapter_model.safetensors`: what the method trained and its buffers, never the frozen backbone) and a typed config
(`adapter_config.json`, `AdapterConfig`: the model's manifest, services/models/manifest.py, which names the backbone,
the method, the classes and the preprocessing); a zip of both and a README (the model card, card.py). Every method,
video models included.

`load_adapter` rebuilds the model from them with the service's own loader (services/models/loading.py), on the
backbone the manifest names (timm's pretrained weights, or the seeded random initialisation it was trained on) or on
one passed in, whose weights must hash as the manifest says:

    from services.export.adapter import load_adapter

    model = load_adapter("model_...-adapter.zip")  # an nn.Module: images -> logits, in float32 on the CPU
    x = torch.stack([model.transform(image.convert("RGB")) for image in images])
    probs = model(x).softmax(-1)  # columns: model.classes (a multi-label model: model(x).sigmoid())
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.numpy import load as load_tensors
from timm.data import create_transform
from torch import nn
from typing_extensions import TypedDict

from services.export import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from services.export.card import ModelFacts, model_card
from services.models.loading import Artifact, Trained, load_trained
from services.models.manifest import Manifest, migrate
from storage.artifacts import tensors_to_bytes
from storage.cache.meta import DataConfig
from storage.manifests import ManifestRecord, ManifestV1Record

CONFIG_NAME, WEIGHTS_NAME = ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
FLAT = ("format", "format_version", "model_id", "preprocessing")  # format 1's own keys, beside the config's


class AdapterConfigRecord(TypedDict):
    """adapter_config.json as written (format 2): `AdapterConfig`'s JSON."""

    format: Literal["sidetune-adapter"]
    format_version: Literal[2]
    model_id: str
    manifest: ManifestRecord


class AdapterConfigV1Record(ManifestV1Record, total=False):
    """adapter_config.json of format 1: an artifact's version 1 config, flat, its `data_config` as `preprocessing`."""

    format: Literal["sidetune-adapter"]
    format_version: Literal[1]
    model_id: str
    preprocessing: DataConfig


class AdapterConfig(BaseModel):
    """adapter_config.json: the model's manifest, which rebuilds it from its trained weights, and its id."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["sidetune-adapter"] = Field("sidetune-adapter", description="What this file is.")
    format_version: Literal[2] = Field(
        2, description="Version of this layout (1: the artifact config's keys flat, `preprocessing` its data_config)."
    )
    model_id: str = Field(..., description="The model in the service it was exported from.")
    manifest: Manifest = Field(..., description="The model's manifest, as the service stores it.")

    @classmethod
    def read(cls, raw: AdapterConfigRecord | AdapterConfigV1Record) -> AdapterConfig:
        """An adapter_config.json of any format version (format 1's keys are an artifact's version 1 config)."""
        if raw.get("format_version") == 1:
            config = ManifestV1Record(
                **{k: v for k, v in raw.items() if k not in FLAT} | {"data_config": raw["preprocessing"]}
            )
            return cls(model_id=raw["model_id"], manifest=migrate(config))
        return cls.model_validate(raw)


def refusal(manifest: Manifest) -> str | None:
    return None  # every method


def _usage(config: AdapterConfig) -> str:
    """The card's loading code: sidetune's `load_adapter`."""
    return f"""`{WEIGHTS_NAME}` holds only what the method trained; `{CONFIG_NAME}` (the model's manifest) names the
backbone, the method, the classes and the preprocessing. With sidetune installed:

```python
import torch
from services.export.adapter import load_adapter

model = load_adapter("{config.model_id}-adapter.zip")  # or this folder, unzipped
probs = model(torch.stack([model.transform(image.convert("RGB")) for image in images])).softmax(-1)
```"""


def write(trained: Trained, folder: Path, facts: ModelFacts) -> Path:
    config = AdapterConfig(model_id=trained.model_id, manifest=trained.manifest)
    path = folder / "model-adapter.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(CONFIG_NAME, config.model_dump_json(indent=2))
        z.writestr(WEIGHTS_NAME, tensors_to_bytes(trained.weights))
        z.writestr("README.md", model_card(facts, "sidetune", _usage(config)))
    return path


def read_adapter(path: str | Path) -> tuple[AdapterConfig, dict[str, np.ndarray]]:
    """The config and weights of an exported adapter: its zip, or the folder it was unzipped to."""
    path = Path(path)
    if path.is_dir():
        raw_config, raw_weights = (path / CONFIG_NAME).read_bytes(), (path / WEIGHTS_NAME).read_bytes()
    else:
        with zipfile.ZipFile(path) as z:
            raw_config, raw_weights = z.read(CONFIG_NAME), z.read(WEIGHTS_NAME)
    return AdapterConfig.read(json.loads(raw_config)), load_tensors(raw_weights)


class AdapterModel(nn.Module):
    """A loaded adapter: images (normalised by `transform`) -> logits over `classes`."""

    def __init__(self, module: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        manifest = config.manifest
        self.module, self.config, self.classes = module, config, list(manifest.classes)
        self.multi_label, self.threshold = manifest.multi_label, manifest.threshold
        # one image, or one frame
        self.transform = create_transform(**manifest.preprocessing.data_config(), is_training=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def load_adapter(path: str | Path, vit: nn.Module | None = None, device: str | torch.device = "cpu") -> AdapterModel:
    """The model of an exported adapter (zip or folder), in float32 on `device`, in eval mode.

    `vit`: the backbone to put it on (a timm ViT; a ViViT for a video model, as services/video/backbone.py builds
    it), changed in place for the methods that merge; by default the one the manifest names is created with timm (its
    pretrained weights, or a local `checkpoint` file). Either way its weights must hash to the manifest's
    `weights_hash`: an adapter never runs silently on other weights (services.models.manifest.BackboneChanged, a
    ValueError)."""
    config, weights = read_adapter(path)
    trained = load_trained(Artifact(config.model_id, config.manifest, weights), paths=None, backbone=vit)
    return AdapterModel(trained.module, config).to(device).eval()
