"""The model card every export carries (`README.md` in a zip or folder; the ONNX graph's `model_card` metadata): a
Hugging Face model card (https://huggingface.co/docs/hub/model-cards), its YAML front matter written by
`huggingface_hub.ModelCardData` (`library_name`, `tags`, `datasets`, `metrics`, and a `model-index` with the test
split's figures, or the validation split's, named as such, when the job had no test split), then what a person needs:
the backbone and its weights hash, the method and its paper, the trainable parameters, the training settings, the
classes, intended use and limits, and the code that loads this export (each format passes its own).

Built from the model's typed manifest (services/models/manifest.py) and its figures as the artifact stores them
(`metrics.json`: services/training/metrics.py; `evaluation.json`: services/training/reports.py). Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from huggingface_hub import EvalResult, ModelCardData

from services.models.manifest import Manifest
from services.training.metrics import JobMetrics
from services.training.reports import EvaluationReport
from storage.artifacts import ArtifactStore

# a method -> its paper (the method's config.py cites it), linked where it has one
PAPERS = {
    "losa": (
        "LoSA: Mercea et al., Time-, Memory- and Parameter-Efficient Visual Adaptation, CVPR 2024",
        "https://arxiv.org/abs/2402.02887",
    ),
    "apla": (
        "APLA: Sorkhei et al., APLA: A Simple Adaptation Method for Vision Transformers, 2025",
        "https://arxiv.org/abs/2503.11335",
    ),
    "arc": (
        "ARC: Dong et al., Efficient Adaptation of Large Vision Transformer via Adapter Re-Composing, NeurIPS 2023",
        "https://arxiv.org/abs/2310.06234",
    ),
    "lora": (
        "LoRA: Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022",
        "https://arxiv.org/abs/2106.09685",
    ),
    "linear": ("a linear probe on the frozen backbone (the baseline of every adaptation paper)", None),
    "full": ("full fine-tuning (the baseline of every adaptation paper)", None),
}
SPLIT_NAMES = {"test": "test", "val": "validation"}
USAGE_HEADING = "## How to load it"  # the card's last section: the format's loading code (hf_card.py rewrites it)
NOT_FIGURES = ("loss", "images")  # metrics.json's `val_loss`, `test_images`: not figures of the model-index


@dataclass(frozen=True)
class Figures:
    """The figures the card reports: the test split's, or the validation split's when the job had no test split."""

    split: Literal["test", "val"]
    images: int
    values: dict[str, float]  # figure (accuracy, macro_f1, map, ...) -> value, as the evaluation wrote it


@dataclass(frozen=True)
class ModelFacts:
    """What a card is made of: the model's manifest and its figures as stored beside its weights."""

    model_id: str
    manifest: Manifest
    metrics: JobMetrics
    evaluation: EvaluationReport | None  # None for a model saved without its report

    @classmethod
    def read(cls, artifacts: ArtifactStore, model_id: str, manifest: Manifest) -> ModelFacts:
        metrics: JobMetrics = artifacts.read_json(model_id, "metrics.json")
        try:
            evaluation: EvaluationReport | None = artifacts.read_json(model_id, "evaluation.json")
        except FileNotFoundError:
            evaluation = None
        return cls(model_id, manifest, metrics, evaluation)

    @property
    def figures(self) -> Figures:
        """The evaluation report's figures; without a report, metrics.json's (the test split's where it had one)."""
        if self.evaluation is not None:
            split = "test" if self.evaluation["split"] == "test" else "val"
            images, named = self.evaluation["images"], self.evaluation["metrics"]
        elif self.metrics.get("test_images"):
            split, images, named = "test", self.metrics["test_images"], self.metrics
        else:
            split, images, named = "val", self.metrics.get("val_images", 0), self.metrics
        prefix = f"{split}_"
        values = {
            k.removeprefix(prefix): float(v)
            for k, v in named.items()
            if k.startswith(prefix) and k.removeprefix(prefix) not in NOT_FIGURES and isinstance(v, int | float)
        }
        return Figures(split, images, values)


def _front_matter(facts: ModelFacts, library: str) -> str:
    manifest, figures = facts.manifest, facts.figures
    split = SPLIT_NAMES[figures.split]
    task = "video-classification" if manifest.video is not None else "image-classification"
    dataset = (
        f"the job's dataset ({facts.metrics.get('train_images', 0)} training images, {len(manifest.classes)} classes)"
    )
    results = [
        EvalResult(
            task_type=task,
            dataset_type="custom",
            dataset_name=dataset,
            dataset_split=split,
            metric_type=name,
            metric_value=value,
            metric_name=f"{split} {name}" + ("" if figures.split == "test" else " (no test split)"),
        )
        for name, value in figures.values.items()
    ]
    data = ModelCardData(
        library_name=library,
        tags=["sidetune", task, "vision-transformer", manifest.backbone.name, manifest.method.name],
        datasets=[dataset],
        metrics=list(figures.values),
        pipeline_tag=task,
        model_name=facts.model_id,
        eval_results=results or None,
    )
    return data.to_yaml()


def _settings(manifest: Manifest) -> str:
    rows = [("mode", manifest.mode)]
    if manifest.tail_blocks is not None:
        rows.append(("tail_blocks", manifest.tail_blocks))
    rows += [(f"method.{k}", v) for k, v in manifest.method.model_dump(mode="json").items() if k != "name"]
    rows += sorted(manifest.hyperparameters.items())
    return "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in rows)


def _figures_table(figures: Figures) -> str:
    split = SPLIT_NAMES[figures.split]
    if not figures.values:
        return "No figures were recorded."
    note = ""
    if figures.split != "test":
        note = (
            " The job had no test split: these are the validation split's figures, on which the model was "
            "selected, so they are optimistic."
        )
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in figures.values.items())
    return f"On the {split} split ({figures.images} images).{note}\n\n| figure | value |\n|---|---|\n{rows}"


def model_card(facts: ModelFacts, library: str, usage: str) -> str:
    """The card (README.md) of an export: front matter, then the model; `usage` is the format's loading code
    (markdown), `library` the `library_name` that loads it (timm, onnx, sidetune)."""
    manifest, metrics = facts.manifest, facts.metrics
    backbone, method = manifest.backbone, manifest.method
    paper, link = PAPERS.get(method.name, (method.name, None))
    weights = backbone.checkpoint or ("timm's pretrained weights" if backbone.pretrained else "random initialisation")
    _, h, w = manifest.preprocessing.input_size
    classes = ", ".join(f"`{c}`" for c in manifest.classes)
    output = (
        f"a sigmoid per tag; a tag is predicted from {manifest.threshold} on"
        if manifest.multi_label
        else "a softmax over the classes"
    )
    return f"""---
{_front_matter(facts, library)}
---

# {facts.model_id}: {method.name} on {backbone.name}

A frozen `{backbone.name}` adapted by sidetune with **{method.name}** ({paper}{f", {link}" if link else ""}).

## Backbone

- timm model `{backbone.name}`, weights: {weights}, input {h} x {w} px
- weights hash (float32, checked by every sidetune loader): `{manifest.weights_hash}`
- preprocessing (timm's data config): `{json.dumps(manifest.preprocessing.data_config())}`

## Training

{metrics.get("trainable_params", 0):,} trainable parameters ({metrics.get("side_params", 0):,} outside the classifier,
the papers' convention), trained on {metrics.get("train_images", 0)} images, selected on {metrics.get("val_images", 0)}
validation images.

| setting | value |
|---|---|
{_settings(manifest)}

## Evaluation

{_figures_table(facts.figures)}

## Classes

{len(manifest.classes)} {"tags" if manifest.multi_label else "classes"}, in the order of the outputs ({output}):
{classes}

## Intended use and limits

For classifying {"clips" if manifest.video is not None else "images"} like those of the job's dataset into these
classes, preprocessed exactly as above. It knows no other class, and its figures hold for data drawn like the
dataset's; on other data (other cameras, domains, resolutions) measure it first. It was evaluated on
{facts.figures.images} images only; the backbone's own license and limits apply.

{USAGE_HEADING}

{usage}
"""
