"""Execution modes end to end on CPU with test_vit: `online` (LoSA with a backbone forward every step), `images`
and `tail` (backbone-adapting methods), each trained by `train_job` and served by the Predictor, whose merged
models must predict what the trained, unmerged modules predict."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from services import methods
from services.backbones import load_backbone
from services.data.datasets import read_imagefolder
from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from services.serving.inference import Predictor
from services.spec import JobSpec
from services.training.job import to_torch, train_job
from storage.artifacts import ArtifactStore
from storage.settings import Settings

BACKBONE = {"name": "test_vit", "pretrained": False}


def job_spec(path: Path, method: dict, mode: str = "auto", epochs: int = 2, **execution) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"path": str(path)},
            "backbone": BACKBONE,
            "method": method,
            "execution": {"mode": mode, **execution},
            "extraction": {"batch_size": 32},
            "training": {"epochs": epochs, "batch_size": 32, "lr": 1e-3, "optimizer": "adamw", "warmup_epochs": 0},
        }
    )


def png_bytes(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def digits(digits_root: Path) -> Path:
    return digits_root / "train"


def test_mode_must_suit_the_method(digits: Path) -> None:
    with pytest.raises(ValidationError, match="execution.mode 'images' is not available for method 'losa'"):
        job_spec(digits, {"name": "losa"}, "images")
    with pytest.raises(ValidationError, match="execution.augment needs mode images or online"):
        job_spec(digits, {"name": "losa"}, "cache", augment=True)
    assert job_spec(digits, {"name": "losa"}).mode == "cache"
    assert job_spec(digits, {"name": "losa"}, "online", augment=True).needs_cache is False


def test_online_losa_needs_no_cache_and_serves(settings: Settings, digits: Path, tmp_path: Path) -> None:
    spec = job_spec(digits, {"name": "losa", "rank": 4, "layers": 3}, "online", epochs=3)
    reporter = NullReporter()
    out = train_job(spec, settings, None, reporter, tmp_path / "ckpt")
    assert any("backbone forward every step" in e["message"] for e in reporter.events)
    assert not settings.cache_dir.exists() or not any(settings.cache_dir.iterdir())  # nothing was cached
    assert out["manifest"].mode == "online" and out["manifest"].cache_key is None
    assert out["metrics"]["val_accuracy"] > 0.2  # chance is 0.1
    ArtifactStore.from_settings(settings).save_model("model_online", out["weights"], out["manifest"], out["metrics"])
    preds = Predictor(settings).predict("model_online", [png_bytes(p) for p in read_imagefolder(digits).paths[:3]])
    assert len(preds) == 3 and all(p["label"] in out["manifest"].classes for p in preds)


def _unmerged_logits(settings: Settings, out: dict, images: torch.Tensor) -> torch.Tensor:
    """The trained module before merging, rebuilt from the saved weights, on images."""
    manifest = out["manifest"]
    backbone = load_backbone(manifest.backbone)
    method = manifest.method
    model = methods.build(method, copy.deepcopy(backbone.model), len(manifest.classes), manifest.tail_blocks)
    model.load_trainable(to_torch(out["weights"]))
    model.eval()
    with torch.inference_mode():
        if manifest.tail_blocks is None:
            return model(images)
        return model(backbone.intermediates(images, model.input_layers))


@pytest.mark.parametrize(
    ("method", "mode"),
    [
        ({"name": "full"}, "images"),
        ({"name": "apla", "rank": 8}, "tail"),
        ({"name": "arc", "rank": 8}, "tail"),
        ({"name": "lora", "rank": 4}, "tail"),
    ],
    ids=["full-images", "apla-tail", "arc-tail", "lora-tail"],
)
def test_adapted_methods_train_and_serve_merged(
    settings: Settings, digits: Path, tmp_path: Path, method: dict, mode: str
) -> None:
    spec = job_spec(digits, method, mode, tail_blocks=2)
    cache_key = run_extraction(spec, settings, NullReporter())["cache_key"] if spec.needs_cache else None
    reporter = NullReporter()
    out = train_job(spec, settings, cache_key, reporter, tmp_path / "ckpt")
    assert out["manifest"].mode == mode and out["manifest"].kind == "adapted"
    assert out["metrics"]["side_params"] > 0  # learning itself is tested in test_learning.py
    if mode == "tail":
        assert out["manifest"].tail_blocks == 2
        # no frozen backbone weights are stored, only what the method trained (plus its buffers) and the head
        assert not any(k.startswith("vit.patch_embed") for k in out["weights"])
    ArtifactStore.from_settings(settings).save_model("model_x", out["weights"], out["manifest"], out["metrics"])

    paths = read_imagefolder(digits).paths[:6]
    predictor = Predictor(settings)
    preds = predictor.predict("model_x", [png_bytes(p) for p in paths])
    backbone = predictor.load("model_x").backbone
    images = torch.stack([backbone.transform(Image.open(p).convert("RGB")) for p in paths])
    expected = _unmerged_logits(settings, out, images).softmax(-1).numpy()
    classes = out["manifest"].classes
    got = np.array([[p["scores"][c] for c in classes] for p in preds])
    np.testing.assert_allclose(got, expected, atol=1e-4)
