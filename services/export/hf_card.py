"""The loading code on an `hf` folder's model card (its README.md's last section, card.py's `USAGE_HEADING`), in two
forms: for the folder as downloaded (`format=hf`, hf_folder.py), code that runs as written in the unzipped folder,
the Hub's form named in prose with a placeholder repo (`HUB_REPO_PLACEHOLDER`); and for the folder as pushed
(`sidetune models push MODEL_ID REPO`, worker/commands/registry.py), the same code loading from REPO.

Torch-free: the CLI names the repo (`name_repo`) on the folder it pushes, writing the section again from what the
folder's own files say (`Layout.read`), without the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing_extensions import TypedDict

from services.export import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, HUB_REPO_PLACEHOLDER
from services.export.card import USAGE_HEADING
from services.models.manifest import Manifest

CARD_NAME, SIDETUNE_NAME = "README.md", "sidetune.json"
TIMM_CONFIG_NAME, TIMM_WEIGHTS_NAME = "config.json", "model.safetensors"  # timm's Hub layout (`save_for_hf`)


class SidetuneJson(TypedDict):
    """`sidetune.json` beside timm's files (timm_checkpoint.py): what timm's config does not say of the model."""

    model_id: str
    method: dict[str, Any]  # the method's config, as the manifest holds it
    backbone: dict[str, Any]  # the backbone's spec, likewise
    multi_label: bool
    threshold: float | None


@dataclass(frozen=True)
class Layout:
    """What an `hf` folder's loading code depends on."""

    timm: bool  # timm's Hub layout; else the adapter's
    model_args: dict[str, Any]  # timm's `create_model` arguments (the image size it was trained at); {} for adapters
    multi_label: bool
    threshold: float | None

    @classmethod
    def read(cls, folder: Path) -> Layout:
        """The layout of an unzipped `hf` export, from its files."""
        if (folder / TIMM_CONFIG_NAME).is_file() and (folder / TIMM_WEIGHTS_NAME).is_file():
            config = json.loads((folder / TIMM_CONFIG_NAME).read_text())
            sidetune: SidetuneJson = json.loads((folder / SIDETUNE_NAME).read_text())
            return cls(True, config.get("model_args", {}), sidetune["multi_label"], sidetune["threshold"])
        if (folder / ADAPTER_CONFIG_NAME).is_file():
            manifest = Manifest.model_validate(json.loads((folder / ADAPTER_CONFIG_NAME).read_text())["manifest"])
            return cls(False, {}, manifest.multi_label, manifest.threshold)
        raise ValueError(f"{folder} is not an `hf` export: neither timm's files nor {ADAPTER_CONFIG_NAME} are there")


def _scores(layout: Layout, logits: str) -> tuple[str, str]:
    """The code turning logits into scores, and what the scores are."""
    if layout.multi_label:
        return f"{logits}.sigmoid()", f"a sigmoid per tag; a tag is predicted from {layout.threshold} on"
    return f"{logits}.softmax(-1)", "a softmax over the classes"


def _once_pushed(code: str) -> str:
    """The prose naming the Hub's form of the loading code, the repo a placeholder."""
    return (
        f"Once pushed to the Hub (`sidetune models push MODEL_ID {HUB_REPO_PLACEHOLDER}`, which names the repo in "
        f"this code), `{code}` loads it from there."
    )


def _timm(layout: Layout, repo: str | None) -> str:
    if repo is None:
        imports = ""
        source = """folder = "."  # this folder, unzipped (where this README.md is)
model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
config = json.load(open(f"{folder}/config.json"))"""
        where = _once_pushed(f'timm.create_model("hf-hub:{HUB_REPO_PLACEHOLDER}", pretrained=True)')
    else:
        imports = "from huggingface_hub import hf_hub_download\n"
        source = f"""model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()
config = json.load(open(hf_hub_download("{repo}", "config.json")))"""
        where = f'A downloaded copy (`huggingface_hub.snapshot_download("{repo}")`) loads with `local-dir:` on it.'
    scores, meaning = _scores(layout, "model(batch)")
    return f"""timm's own Hub layout (`{TIMM_CONFIG_NAME}`, `{TIMM_WEIGHTS_NAME}`): timm alone loads it, no sidetune
needed, at the image size it was trained at (`{TIMM_CONFIG_NAME}`'s `model_args`: `{layout.model_args}`). {where}

```python
import json

import timm
import torch
{imports}from PIL import Image

{source}
transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=config["pretrained_cfg"]))
classes = config["label_names"]  # the outputs' order
images = [Image.open(path).convert("RGB") for path in paths]  # `paths`: your image files
with torch.inference_mode():
    batch = torch.stack([transform(image) for image in images])
    probs = {scores}
```
Scores: {meaning}."""


def _adapter(layout: Layout, repo: str | None) -> str:
    if repo is None:
        imports, source = "", 'load_adapter(".")  # this folder, unzipped (where this README.md is)'
        where = _once_pushed(f'load_adapter(snapshot_download("{HUB_REPO_PLACEHOLDER}"))')
    else:
        imports = "from huggingface_hub import snapshot_download\n"
        source = f'load_adapter(snapshot_download("{repo}"))'
        where = "A downloaded copy of this repo loads with `load_adapter` on its folder."
    scores, meaning = _scores(layout, "model(batch)")
    return f"""`{ADAPTER_WEIGHTS_NAME}` holds only what the method trained; `{ADAPTER_CONFIG_NAME}` (the model's
manifest) names the backbone, the method, the classes and the preprocessing. It loads with sidetune installed. {where}

```python
import torch
{imports}from PIL import Image
from services.export.adapter import load_adapter

model = {source}
images = [Image.open(path).convert("RGB") for path in paths]  # `paths`: your image files
with torch.inference_mode():
    batch = torch.stack([model.transform(image) for image in images])
    probs = {scores}  # columns: model.classes
```
Scores: {meaning}."""


def usage(layout: Layout, repo: str | None = None) -> str:
    """The card's loading section (markdown): for the unzipped folder, or for the Hub repo `repo`."""
    return _timm(layout, repo) if layout.timm else _adapter(layout, repo)


def name_repo(folder: Path, repo: str) -> None:
    """Make the card of `folder` (an unzipped `hf` export) load the model from the Hub repo `repo`: its loading
    section, the card's last, written again from the folder's files for that repo; the rest of the card unchanged."""
    card = folder / CARD_NAME
    head, heading, _ = card.read_text().partition(f"\n{USAGE_HEADING}\n")
    if not heading:
        raise ValueError(f"{card} has no {USAGE_HEADING!r} section: not the card of a sidetune `hf` export")
    card.write_text(f"{head}{heading}\n{usage(Layout.read(folder), repo)}\n")
