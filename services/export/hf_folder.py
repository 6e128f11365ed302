"""Export as a Hugging Face Hub folder (`format=hf`): what `huggingface_hub.upload_folder` uploads as a model repo,
zipped flat like the other formats; `sidetune models push MODEL_ID REPO` (worker/commands/registry.py) exports it,
names the repo in the card and uploads it.

- A model that merges into a plain ViT (the ones `timm` takes: APLA, ARC, LoRA, full; a linear probe read out by
  timm's head): timm's own Hub layout, as timm_checkpoint.py's `save_timm` writes it: `model.safetensors` and
  timm's `config.json` (`architecture`, `num_classes`, `label_names`, `model_args` with the image size it was trained
  at, `pretrained_cfg` with its input size and the preprocessing the service used), `sidetune.json`, and the model
  card (`library_name: timm`). timm alone loads it: `timm.create_model("hf-hub:OWNER/REPO", pretrained=True)`, or
  `local-dir:` on the folder.
- Every other model (LoSA's side network, a video model's ViViT, a probe timm's head cannot compute): the adapter
  layout (adapter.py: `adapter_model.safetensors`, `adapter_config.json`) and the card (`library_name: sidetune`),
  rebuilt with sidetune's `load_adapter` from the downloaded folder.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from services.export import HUB_REPO_PLACEHOLDER as REPO
from services.export import ExportError, adapter, timm_checkpoint
from services.export.card import ModelFacts, model_card
from services.models.loading import Trained
from services.models.manifest import Manifest
from storage.artifacts import tensors_to_bytes


def refusal(manifest: Manifest) -> str | None:
    return None  # every model: timm's layout where it applies, the adapter's otherwise


def _timm_usage(trained: Trained, model_args: dict[str, int]) -> str:
    """The card's loading code for timm's layout: from the Hub, or from the folder."""
    scores = "`logits.sigmoid()` per tag (multi-label)" if trained.manifest.multi_label else "`logits.softmax(-1)`"
    return f"""timm's own Hub layout (`config.json`, `model.safetensors`): timm alone loads it, no sidetune needed,
at the image size it was trained at (`config.json`'s `model_args`: `{model_args}`).

```python
import json, timm, torch
from huggingface_hub import hf_hub_download

model = timm.create_model("hf-hub:{REPO}", pretrained=True).eval()  # or "local-dir:<this folder>"
config = json.load(open(hf_hub_download("{REPO}", "config.json")))
transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=config["pretrained_cfg"]))
classes = config["label_names"]
# logits = model(torch.stack([transform(image.convert("RGB")) for image in images]))
```
Scores: {scores}."""


def _adapter_usage() -> str:
    """The card's loading code for the adapter layout: the repo downloaded, then sidetune's `load_adapter`."""
    return f"""`{adapter.WEIGHTS_NAME}` holds only what the method trained; `{adapter.CONFIG_NAME}` (the model's
manifest) names the backbone, the method, the classes and the preprocessing. With sidetune installed:

```python
import torch
from huggingface_hub import snapshot_download
from services.export.adapter import load_adapter

model = load_adapter(snapshot_download("{REPO}"))  # or this folder
probs = model(torch.stack([model.transform(image.convert("RGB")) for image in images])).softmax(-1)
```"""


def _write_timm(trained: Trained, out: Path, facts: ModelFacts) -> bool:
    """timm's layout into `out`, or False where the model is not a plain ViT (nothing written then)."""
    if timm_checkpoint.refusal(trained.manifest) is not None:
        return False
    try:
        model_args = timm_checkpoint.save_timm(trained, out)
    except ExportError:  # a probe whose readout timm's head does not compute, found on the weights
        return False
    (out / "README.md").write_text(model_card(facts, "timm", _timm_usage(trained, model_args)))
    return True


def write(trained: Trained, folder: Path, facts: ModelFacts) -> Path:
    out = folder / "hf"
    if not _write_timm(trained, out, facts):
        out.mkdir(parents=True, exist_ok=True)
        config = adapter.AdapterConfig(model_id=trained.model_id, manifest=trained.manifest)
        (out / adapter.CONFIG_NAME).write_text(config.model_dump_json(indent=2))
        (out / adapter.WEIGHTS_NAME).write_bytes(tensors_to_bytes(trained.weights))
        (out / "README.md").write_text(model_card(facts, "sidetune", _adapter_usage()))
    path = folder / "model-hf.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:  # safetensors hardly compress
        for f in sorted(out.iterdir()):
            z.write(f, f.name)
    return path
