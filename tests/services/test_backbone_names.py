"""Backbone names are checked at submission, without torch: timm ViTs that sidetune supports (services/vit_names.txt,
generated from timm) pass, anything else is refused naming `backbone.name`; a ViT without a class token (SigLIP's,
with an attention-pooling head) is supported with mean pooling, end to end."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import timm
import torch
from pydantic import ValidationError

from services.architectures import supported_names
from services.spec import BackboneSpec, JobSpec


def test_the_name_list_matches_timm() -> None:
    listed = set(timm.list_models(module=["vision_transformer", "deit"]))
    names = supported_names()
    assert names <= listed and "test_vit" in names and "vit_base_patch16_224" in names
    for name in sorted(listed - names):  # left out: a final norm other than LayerNorm (the readout reads LayerNorms)
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
        assert not all(isinstance(n, torch.nn.LayerNorm | torch.nn.Identity) for n in (model.norm, model.fc_norm))
    for name in random.Random(0).sample(sorted(names), 8):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
        assert hasattr(model, "forward_intermediates") and hasattr(model, "blocks"), name


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny", "vit_nonexistent_patch16_224", "eva02_tiny_patch14_224"])
def test_other_models_are_refused_at_submission(name: str) -> None:
    with pytest.raises(ValidationError, match=f"backbone '{name}' is not a timm ViT that sidetune supports") as info:
        BackboneSpec(name=name, image_size=224)
    assert info.value.errors()[0]["loc"] == ("name",)


def test_pretrained_tags_are_accepted() -> None:
    assert BackboneSpec(name="vit_base_patch16_224.augreg_in21k").name == "vit_base_patch16_224.augreg_in21k"


def test_a_vit_without_class_token_trains_with_mean_pooling(settings, digits_root: Path) -> None:
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter
    from services.training.job import train_job

    spec = JobSpec.model_validate(
        {
            "dataset": {"path": str(digits_root / "train")},
            "backbone": {"name": "vit_base_patch16_siglip_224", "pretrained": False, "image_size": 32},
            "method": {"name": "linear"},
            "training": {"epochs": 1},
        }
    )
    result = run_extraction(spec, settings, NullReporter())
    out = train_job(spec, settings, result["cache_key"], NullReporter(), settings.data_path / "ckpt")
    assert out["manifest"].features.num_prefix_tokens == 0 and out["manifest"].input_tokens == "mean"
    assert 0.0 <= out["metrics"]["val_accuracy"] <= 1.0


def test_pretrained_weights_that_cannot_be_had_fail_at_once() -> None:
    """Not in the local cache and the hub unreachable (as on this machine): a BackboneError naming the way out within
    seconds, where the hub's client retried for most of a minute. Where the hub answers, the weights load."""
    import time

    from services.backbones import load_backbone
    from services.errors import BackboneError

    t0 = time.monotonic()
    try:
        load_backbone(BackboneSpec(name="vit_tiny_patch16_224", pretrained=True, image_size=32))
    except BackboneError as e:
        assert "unreachable" in str(e) and "pretrained: false" in str(e), e
    assert time.monotonic() - t0 < 15
