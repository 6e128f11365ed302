"""Export: a trained model leaves the service in the format where its users deploy it.

- `timm` (timm_checkpoint.py): the merged ViT (APLA, ARC, LoRA, full; a linear probe whose readout is timm's head) as
  a plain timm checkpoint, `model.safetensors` and timm's `config.json`, loaded by timm alone.
- `onnx` (onnx_graph.py): backbone plus merged head or side network as one graph, dynamic batch, class names and
  preprocessing in its metadata. Every method, video models included.
- `adapter` (adapter.py): the trained weights alone and a typed config naming backbone, method, classes and
  preprocessing (PEFT's adapter_config.json in spirit); `load_adapter` rebuilds the model from them.
- `mlflow` (mlflow_model.py): an MLflow model, pyfunc flavour (code: mlflow_pyfunc.py, onnxruntime and timm's eval
  transform, no sidetune) around the `onnx` export's graph, with a signature (images, or a video model's clips, as
  base64 strings -> a probability per class) and an input example. Every method, video models included. Needs the
  `mlflow` extra in the inference service.
- `hf` (hf_folder.py): a folder for `huggingface_hub.upload_folder` (`sidetune models push`): timm's own Hub layout for
  the models `timm` takes, the adapter layout otherwise; the card as its README.md.

The inference service runs exports (`GET /models/{id}/export`, api/routes/export.py): they need torch, which the
API never imports. This module is torch-free (the formats' names and the refusal), each format's module imports torch.
Every format starts from `services.models.loading.load_trained`: the model as the service predicts with it (rebuilt
by the same loader), in float32 on the CPU. Every format carries a model card (card.py: `README.md`, or the ONNX
graph's `model_card` metadata) built from the model's manifest and its stored figures.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from services.models.manifest import Manifest

HUB_REPO_PLACEHOLDER = "OWNER/REPO"  # the repo a downloaded `hf` card names in its prose; pushing names the real one
# the adapter layout's files (adapter.py), here torch-free: the `hf` card (hf_card.py) reads and names them
ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"

ExportFormat = Literal["timm", "onnx", "adapter", "mlflow", "hf"]


@dataclass(frozen=True)
class Format:
    module: str  # services/export/<module>.py: `refusal(manifest)` and `write(trained, folder, facts) -> Path`
    suffix: str
    media_type: str
    description: str


FORMATS: dict[str, Format] = {
    "timm": Format(
        "timm_checkpoint",
        "-timm.zip",
        "application/zip",
        "a plain timm checkpoint: model.safetensors "
        "and timm's config.json (APLA, ARC, LoRA, full; linear probes read out by timm's head)",
    ),
    "onnx": Format(
        "onnx_graph",
        ".onnx",
        "application/octet-stream",
        "one ONNX graph, pixels -> logits, dynamic batch; class names and preprocessing in its metadata (every method)",
    ),
    "adapter": Format(
        "adapter",
        "-adapter.zip",
        "application/zip",
        "the trained weights (adapter_model.safetensors) "
        "and adapter_config.json; rebuilt by services.export.adapter.load_adapter (every method)",
    ),
    "mlflow": Format(
        "mlflow_model",
        "-mlflow.zip",
        "application/zip",
        "an MLflow model (pyfunc; images or clips as base64 strings -> a probability per class) running the ONNX graph "
        "with onnxruntime, loaded by mlflow.pyfunc.load_model (every method; needs the `mlflow` extra)",
    ),
    "hf": Format(
        "hf_folder",
        "-hf.zip",
        "application/zip",
        "a Hugging Face Hub model folder for huggingface_hub.upload_folder (`sidetune models push`): timm's Hub "
        "layout (config.json with label_names and pretrained_cfg, model.safetensors) for the models `timm` takes, "
        "the adapter layout otherwise; the model card as README.md (every method)",
    ),
}


class ExportError(ValueError):
    """The model cannot be exported in that format; the message says why and what to use instead."""


def refusal(manifest: Manifest, fmt: str) -> str | None:
    """Why the model of this manifest cannot be exported as `fmt`, or None. Cheap: nothing is loaded."""
    return importlib.import_module(f"{__name__}.{FORMATS[fmt].module}").refusal(manifest)


@dataclass(frozen=True)
class Exported:
    path: Path
    filename: str
    media_type: str


def export_model(artifacts: Any, settings: Any, model_id: str, fmt: str, folder: Path) -> Exported:
    """Write model `model_id` of the artifact store as `fmt` into `folder`; ExportError when it cannot be."""
    from services.export.card import ModelFacts
    from services.models.loading import load_trained, read_artifact
    from services.paths import UserPaths

    spec = FORMATS[fmt]
    artifact = read_artifact(artifacts, model_id)
    reason = refusal(artifact.manifest, fmt)
    if reason:
        raise ExportError(reason)
    facts = ModelFacts.read(artifacts, model_id, artifact.manifest)
    trained = load_trained(artifact, UserPaths(settings))
    path = importlib.import_module(f"{__name__}.{spec.module}").write(trained, folder, facts)
    return Exported(path, f"{model_id}{spec.suffix}", spec.media_type)
