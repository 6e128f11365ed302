"""Export as a plain timm checkpoint: a zip of `model.safetensors` and timm's own `config.json` (written by
`timm.models.save_for_hf`, the Hugging Face Hub layout: architecture, model_args, pretrained_cfg with the
preprocessing the service used, label_names), and a README: the model card (card.py) with the lines that load
it. Without sidetune:

    timm.create_model("local-dir:<unzipped folder>", pretrained=True)
    timm.create_model(name, pretrained=True, num_classes=C,
                      pretrained_cfg_overlay={"file": "<folder>/model.safetensors", "num_classes": C})

(`num_classes` goes into the overlay too: timm drops a checkpoint's classifier whose class count differs from its
pretrained_cfg's.) For the methods that merge into the ViT (APLA, ARC, LoRA, full) and for a linear probe whose readout
is timm's own head (its pooling is the backbone's); not for LoSA (a side network) nor video models (a ViViT).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import timm
import torch
from timm.models import save_for_hf
from torch import nn

from services.export import ExportError
from services.export.card import ModelFacts, model_card
from services.export.hf_card import SIDETUNE_NAME, SidetuneJson
from services.modality import modality_for
from services.models.loading import SideClassifier, Trained
from services.models.manifest import Manifest

TIMM_POOL = {"cls": "token", "mean": "avg"}  # a readout pooling -> the timm global_pool that computes the same


def _linear_pool(manifest: Manifest) -> str:
    pool = manifest.method.pool
    if pool == "auto":
        pool = "cls" if manifest.features.global_pool == "token" else "mean"
    return pool


def refusal(manifest: Manifest) -> str | None:
    name = manifest.method.name
    if (kind_refusal := modality_for(manifest).timm_refusal()) is not None:
        return kind_refusal  # a video model's ViViT
    if manifest.kind != "side":
        return None
    if name != "linear":
        return (
            f"{name} is a side network on the backbone's activations, not part of a timm ViT; export `onnx` (one "
            "graph) or `adapter`"
        )
    pool, head = _linear_pool(manifest), manifest.features.global_pool
    if TIMM_POOL.get(pool) != head:
        return (
            f"this linear probe pools `{pool}` while the backbone's timm head pools `{head}`, so "
            "no timm checkpoint computes it; export `onnx` or `adapter`"
        )
    return None


def _linear_vit(trained: Trained) -> nn.Module:
    """A linear probe as the backbone with its head: timm's norm, pooling and fc_norm are the probe's frozen readout
    (the same tensors, the same order), so only the classifier is new."""
    module: SideClassifier = trained.module
    readout = module.side.readout
    if readout.pre_pooled and readout.pool == "mean" and readout.norm_weight.numel():
        raise ExportError(
            "this linear probe reads the mean token pooled before the final norm, which timm's head does "
            "not compute; export `onnx` or `adapter`"
        )
    vit = module.vit
    vit.reset_classifier(len(trained.classes))
    vit.head.load_state_dict(module.side.head.state_dict())
    return vit.eval()


def _check_plain(vit: nn.Module, name: str, num_classes: int, model_args: dict[str, int]) -> None:
    """The state dict must be what timm builds for `name`, key for key and shape for shape: anything the method
    left behind (a wrapper, an extra buffer) would not load in timm."""
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_args)
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:5]
        raise RuntimeError(f"the merged model is not a plain {name} (state dicts differ: {diff})")


def _usage(trained: Trained, model_args: dict[str, int]) -> str:
    """The card's loading code: timm alone, from this folder or by name with the weights file."""
    manifest = trained.manifest
    name, c = manifest.backbone.name, len(trained.classes)
    extra = "".join(f", {k}={v!r}" for k, v in model_args.items())
    scores = "Scores: `logits.softmax(-1)`."
    if manifest.multi_label:
        scores = (
            f"Multi-label: `logits.sigmoid()` per tag; a tag is predicted from {manifest.threshold} "
            "on (`sidetune.json`)."
        )
    return f"""A plain timm ViT: timm alone loads it, no sidetune needed.

```python
import json, timm, torch

model = timm.create_model("local-dir:.", pretrained=True).eval()  # this folder, unzipped
# or by name, with the weights file (the image size it was trained at, and the class count):
model = timm.create_model("{name}", pretrained=True, num_classes={c}{extra},
                          pretrained_cfg_overlay={{"file": "model.safetensors", "num_classes": {c}}}).eval()

config = json.load(open("config.json"))
transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=config["pretrained_cfg"]))
classes = config["label_names"]
# logits = model(torch.stack([transform(image.convert("RGB")) for image in images]))
```
{scores}"""


def save_timm(trained: Trained, out: Path) -> dict[str, int]:
    """Write the model as timm's Hub layout into folder `out` (`model.safetensors`, timm's `config.json`) and
    `sidetune.json`; returns the model arguments timm needs to build it by name (the image size it was trained at)."""
    manifest = trained.manifest
    vit = trained.module if manifest.kind != "side" else _linear_vit(trained)
    spec = manifest.backbone
    model_args: dict[str, int] = {"img_size": spec.image_size} if spec.image_size else {}  # timm's create_model's
    _check_plain(vit, spec.name, len(trained.classes), model_args)
    save_for_hf(
        vit,
        str(out),
        model_config={"label_names": trained.classes},
        model_args=model_args or None,
        safe_serialization=True,
        data_config=manifest.preprocessing.data_config(),
    )
    sidetune: SidetuneJson = {
        "model_id": trained.model_id,
        "method": manifest.method.model_dump(mode="json"),
        "backbone": spec.model_dump(mode="json"),
        "multi_label": manifest.multi_label,
        "threshold": manifest.threshold,
    }
    (out / SIDETUNE_NAME).write_text(json.dumps(sidetune, indent=2))
    return model_args


def write(trained: Trained, folder: Path, facts: ModelFacts) -> Path:
    out = folder / "timm"
    model_args = save_timm(trained, out)
    (out / "README.md").write_text(model_card(facts, "timm", _usage(trained, model_args)))
    path = folder / "model-timm.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:  # safetensors hardly compress
        for f in sorted(out.iterdir()):
            z.write(f, f.name)
    return path
