"""Export as an adapter, in the spirit of PEFT's saved adapters: the trained weights alone
(`adapter_model.safetensors`: what the method trained and its buffers, never the frozen backbone) and a typed config
(`adapter_config.json`, `AdapterConfig`) naming the backbone, the method, the classes and the preprocessing; a zip of
both and a README. Every method, video models included.

`load_adapter` rebuilds the model from them, on the backbone the config names (timm's pretrained weights, or the
seeded random initialisation it was trained on) or on one passed in, whose weights must hash as the config says:

    from services.export.adapter import load_adapter

    model = load_adapter("model_...-adapter.zip")  # an nn.Module: images -> logits, in float32 on the CPU
    x = torch.stack([model.transform(image.convert("RGB")) for image in images])
    probs = model(x).softmax(-1)  # columns: model.classes (a multi-label model: model(x).sigmoid())
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.numpy import load as load_tensors
from timm.data import create_transform
from torch import nn

from services.backbones import weights_hash
from services.export.model import Trained, classifier, frozen_backbone
from services.methods import MethodConfig
from services.spec import BackboneSpec
from storage.artifacts import tensors_to_bytes

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


class AdapterConfig(BaseModel):
    """adapter_config.json: everything that rebuilds the model from its trained weights."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["sidetune-adapter"] = Field("sidetune-adapter", description="What this file is.")
    format_version: Literal[1] = Field(1, description="Version of this layout.")
    model_id: str = Field(..., description="The model in the service it was exported from.")
    method: MethodConfig = Field(..., description="The method and its configuration (services/methods/<name>).")
    kind: Literal["side", "adapted"] = Field(
        ...,
        description="`side`: a side network on the backbone's activations (linear, LoSA); `adapted`: the method "
        "changes the backbone (APLA, ARC, LoRA, full) and is merged into it.",
    )
    mode: str = Field(..., description="The execution mode it was trained in (cache, online, images, tail).")
    tail_blocks: int | None = Field(None, description="`tail` mode: the last k blocks were adapted.")
    backbone: BackboneSpec = Field(..., description="The frozen backbone: timm name, weights, image size, video.")
    weights_hash: str = Field(..., description="Hash of the backbone's float32 weights the adapter was trained on.")
    classes: list[str] = Field(..., description="Class names (tags, multi-label), in the order of the logits.")
    multi_label: bool = Field(False, description="Multi-label: a sigmoid per tag, not a softmax over the classes.")
    threshold: float | None = Field(None, description="Multi-label: the score from which a tag is predicted.")
    preprocessing: dict[str, Any] = Field(
        ...,
        description="timm's data config of the backbone: input_size, interpolation, crop_pct, crop_mode, mean, "
        "std (each frame of a clip alike).",
    )
    feature_info: dict[str, Any] | None = Field(None, description="Side networks: the activations they read.")
    input_layers: list[int] | None = Field(None, description="Side networks: the backbone blocks they tap.")
    input_tokens: str | None = Field(None, description="Side networks: the tokens of each tap (all, cls, mean).")

    @classmethod
    def of(cls, model_id: str, config: dict[str, Any]) -> AdapterConfig:
        """From an artifact's config.json (services/training/job.py)."""
        fields = {k: config.get(k) for k in cls.model_fields if k in config}
        return cls(model_id=model_id, preprocessing=config["data_config"], **fields)

    def artifact_config(self) -> dict[str, Any]:
        """As an artifact's config.json, which services/export/model.py builds models from."""
        out = self.model_dump(mode="json", exclude={"format", "format_version", "model_id", "preprocessing"})
        return {**out, "data_config": self.preprocessing}


def refusal(config: dict[str, Any]) -> str | None:
    return None  # every method


def _readme(config: AdapterConfig) -> str:
    what = f"{config.method.name} adapter for {config.backbone.name}, {len(config.classes)} classes"
    return f"""# {config.model_id}: {what}

`{WEIGHTS_NAME}` holds only what the method trained; `{CONFIG_NAME}` names the backbone, the method, the classes
and the preprocessing. With sidetune installed:

```python
from services.export.adapter import load_adapter

model = load_adapter("{config.model_id}-adapter.zip")  # or this folder, unzipped
probs = model(torch.stack([model.transform(image.convert("RGB")) for image in images])).softmax(-1)
```
"""


def write(trained: Trained, folder: Path) -> Path:
    config = AdapterConfig.of(trained.model_id, trained.config)
    path = folder / "model-adapter.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(CONFIG_NAME, config.model_dump_json(indent=2))
        z.writestr(WEIGHTS_NAME, tensors_to_bytes(trained.weights))
        z.writestr("README.md", _readme(config))
    return path


def read_adapter(path: str | Path) -> tuple[AdapterConfig, dict[str, np.ndarray]]:
    """The config and weights of an exported adapter: its zip, or the folder it was unzipped to."""
    path = Path(path)
    if path.is_dir():
        raw_config, raw_weights = (path / CONFIG_NAME).read_bytes(), (path / WEIGHTS_NAME).read_bytes()
    else:
        with zipfile.ZipFile(path) as z:
            raw_config, raw_weights = z.read(CONFIG_NAME), z.read(WEIGHTS_NAME)
    return AdapterConfig.model_validate(json.loads(raw_config)), load_tensors(raw_weights)


class AdapterModel(nn.Module):
    """A loaded adapter: images (normalised by `transform`) -> logits over `classes`."""

    def __init__(self, module: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        self.module, self.config, self.classes = module, config, list(config.classes)
        self.multi_label, self.threshold = config.multi_label, config.threshold
        self.transform = create_transform(**config.preprocessing, is_training=False)  # one image, or one frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def load_adapter(path: str | Path, vit: nn.Module | None = None, device: str | torch.device = "cpu") -> AdapterModel:
    """The model of an exported adapter (zip or folder), in float32 on `device`, in eval mode.

    `vit`: the backbone to put it on (a timm ViT; a ViViT for a video model, as services/video/backbone.py builds
    it), changed in place for the methods that merge; by default the one `backbone` names is created with timm (its
    pretrained weights, or a local `checkpoint` file). Either way its weights must hash to `weights_hash`: an adapter
    never runs silently on other weights (ValueError)."""
    config, weights = read_adapter(path)
    artifact = config.artifact_config()
    if vit is None:
        vit = frozen_backbone(artifact, paths=None).model
    elif weights_hash(vit) != config.weights_hash:
        raise ValueError(
            f"this {config.backbone.name} has other weights than the adapter was trained on "
            f"({weights_hash(vit)} instead of {config.weights_hash})"
        )
    vit = vit.float().eval().requires_grad_(False)
    return AdapterModel(classifier(artifact, weights, vit), config).to(device).eval()
