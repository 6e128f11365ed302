"""Export as a Hugging Face Hub folder (`format=hf`): what `huggingface_hub.upload_folder` uploads as a model repo,
zipped flat like the other formats. Its card's loading code (hf_card.py) runs as written in the unzipped folder;
`sidetune models push MODEL_ID REPO` (worker/commands/registry.py) exports it, makes the card's code load from REPO
(`hf_card.name_repo`) and uploads it.

- A model that merges into a plain ViT (the ones `timm` takes: APLA, ARC, LoRA, full; a linear probe read out by
  timm's head): timm's own Hub layout, as timm_checkpoint.py's `save_timm` writes it: `model.safetensors` and
  timm's `config.json` (`architecture`, `num_classes`, `label_names`, `model_args` with the image size it was trained
  at, `pretrained_cfg` with its input size and the preprocessing the service used), `sidetune.json`, and the model
  card (`library_name: timm`). timm alone loads it: `local-dir:` on the folder, or once pushed
  `timm.create_model("hf-hub:OWNER/REPO", pretrained=True)`.
- Every other model (LoSA's side network, a video model's ViViT, a probe timm's head cannot compute): the adapter
  layout (adapter.py: `adapter_model.safetensors`, `adapter_config.json`) and the card (`library_name: sidetune`),
  rebuilt with sidetune's `load_adapter` from the folder (the unzipped export, or the repo downloaded).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from services.export import ExportError, adapter, timm_checkpoint
from services.export.card import ModelFacts, model_card
from services.export.hf_card import CARD_NAME, Layout, usage
from services.models.loading import Trained
from services.models.manifest import Manifest
from storage.artifacts import tensors_to_bytes


def refusal(manifest: Manifest) -> str | None:
    return None  # every model: timm's layout where it applies, the adapter's otherwise


def _write_timm(trained: Trained, out: Path, facts: ModelFacts) -> bool:
    """timm's layout into `out`, or False where the model is not a plain ViT (nothing written then)."""
    if timm_checkpoint.refusal(trained.manifest) is not None:
        return False
    try:
        timm_checkpoint.save_timm(trained, out)
    except ExportError:  # a probe whose readout timm's head does not compute, found on the weights
        return False
    # the card's code from the files written, as `hf_card.name_repo` writes it again when pushing
    (out / CARD_NAME).write_text(model_card(facts, "timm", usage(Layout.read(out))))
    return True


def write(trained: Trained, folder: Path, facts: ModelFacts) -> Path:
    out = folder / "hf"
    if not _write_timm(trained, out, facts):
        out.mkdir(parents=True, exist_ok=True)
        config = adapter.AdapterConfig(model_id=trained.model_id, manifest=trained.manifest)
        (out / adapter.CONFIG_NAME).write_text(config.model_dump_json(indent=2))
        (out / adapter.WEIGHTS_NAME).write_bytes(tensors_to_bytes(trained.weights))
        (out / CARD_NAME).write_text(model_card(facts, "sidetune", usage(Layout.read(out))))
    path = folder / "model-hf.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:  # safetensors hardly compress
        for f in sorted(out.iterdir()):
            z.write(f, f.name)
    return path
