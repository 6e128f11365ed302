"""LoRA (through peft) and full fine-tuning: parameter counts, step-0 equality, merging, tail mode, saved state."""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from pydantic import ValidationError
from torch import nn

from services import methods
from services.methods.full.config import FullConfig
from services.methods.full.model import FullFineTune
from services.methods.lora.config import LoraMethodConfig
from services.methods.lora.model import Lora


@functools.cache
def _random_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=0).eval()


def small_vit() -> nn.Module:
    """A fresh copy of one random-init 6-block `test_vit` (dim 64, MLP 192): builds modify their ViT in place."""
    return copy.deepcopy(_random_vit())


def images(vit: nn.Module, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, *vit.patch_embed.img_size, generator=torch.Generator().manual_seed(1))


def randomise_lora(model: nn.Module) -> None:
    """Non-zero B (A is already random), as after some training steps."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def lora_params(dim: int, hidden: int, blocks: int, rank: int) -> int:
    """r x (in + out) per adapted Linear: qkv (D -> 3D), proj (D -> D), fc1 (D -> H), fc2 (H -> D)."""
    return blocks * rank * ((dim + 3 * dim) + (dim + dim) + (dim + hidden) + (hidden + dim))


def test_lora_parameters_vit_b16_on_meta() -> None:
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        model = methods.build(LoraMethodConfig(rank=8), vit, 10, None)
    assert isinstance(model, Lora)
    assert model.side_parameters() == lora_params(768, 3072, 12, 8) == 1_179_648
    # only LoRA's A and B and the classifier train; peft must not have frozen the head
    head = {id(p) for p in model.head.parameters()}
    assert all(p.requires_grad for p in model.head.parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in head]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_lora_parameters_subset_of_targets() -> None:
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        model = methods.build(LoraMethodConfig(rank=4, targets=["qkv", "fc2"]), vit, 10, 3)
    assert model.side_parameters() == 3 * 4 * ((768 + 2304) + (3072 + 768))


def test_lora_step0_equals_pretrained() -> None:
    vit = small_vit()
    x = images(vit)
    with torch.no_grad():
        expected = vit.forward_features(x)
        model = methods.build(LoraMethodConfig(), small_vit(), 5, None).eval()
        got = model.vit.forward_features(x)
    assert torch.equal(got, expected)


def test_lora_merge_equals_unmerged_and_leaves_no_peft() -> None:
    model = methods.build(LoraMethodConfig(rank=4, alpha=8.0), small_vit(), 5, None).eval()
    randomise_lora(model)
    x = images(model.vit)
    with torch.no_grad():
        unmerged = model(x)
        merged = model.merge()
        assert not any(type(m).__module__.startswith("peft") for m in merged.modules())
        assert not any("lora_" in k or "base_layer" in k for k in merged.state_dict())
        assert not hasattr(merged, "peft_config")
        assert type(merged.blocks[0].attn.qkv) is nn.Linear
        got = merged(x)
    # the deltas really moved the weights (B was non-zero), and merging kept the function
    assert not torch.allclose(unmerged, methods.build(LoraMethodConfig(), small_vit(), 5, None).eval()(x))
    assert torch.allclose(got, unmerged, atol=1e-5)


def test_lora_tail_mode() -> None:
    vit = small_vit()
    num_layers = len(vit.blocks)
    model = methods.build(LoraMethodConfig(), small_vit(), 5, 2).eval()
    assert model.input_layers == [num_layers - 3]
    adapted = {n for n, m in model.vit.named_modules() if type(m).__module__.startswith("peft")}
    assert adapted == {
        f"blocks.{i}.{path}"
        for i in (num_layers - 2, num_layers - 1)
        for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert type(model.vit.patch_embed.proj) is nn.Conv2d
    assert model.side_parameters() == lora_params(vit.embed_dim, 3 * vit.embed_dim, 2, 8)

    randomise_lora(model)
    x = images(vit)
    with torch.no_grad():
        spatial, prefix = model.vit.forward_intermediates(
            x,
            indices=[num_layers - 3],
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )[0]
        cached = torch.cat([prefix, spatial], dim=1).unsqueeze(1)  # [B, 1, T, D], as the cache stores it
        from_cache = model(cached)
        model.input_layers = None  # the same weights, run on images
        from_images = model(x)
    assert torch.allclose(from_cache, from_images, atol=1e-6)


def test_lora_trainable_state_round_trip() -> None:
    vit = small_vit()
    model = methods.build(LoraMethodConfig(), small_vit(), 5, None).eval()
    randomise_lora(model)
    with torch.no_grad():
        model.head.weight.normal_()
    state = model.trainable_state()
    assert state and all("lora_" in k or k.endswith(("head.weight", "head.bias")) for k in state)
    assert not any("base_layer" in k for k in state)
    assert len([k for k in state if "lora_" in k]) == 2 * 4 * len(vit.blocks)

    fresh = methods.build(LoraMethodConfig(), small_vit(), 5, None).eval()
    fresh.load_trainable(state)
    x = images(vit)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="do not fit"):  # LoRA on other blocks: unexpected keys
        methods.build(LoraMethodConfig(), small_vit(), 5, 2).load_trainable(state)


def test_lora_config_validation() -> None:
    assert LoraMethodConfig().targets == ["qkv", "proj", "fc1", "fc2"]
    for bad in (
        {"targets": []},
        {"targets": ["qkv", "qkv"]},
        {"targets": ["q"]},
        {"rank": 0},
        {"dropout": 1.0},
        {"alpha": 0},
        {"scale": 1},
    ):
        with pytest.raises(ValidationError):
            LoraMethodConfig(**bad)
    assert LoraMethodConfig.kind == "adapted" and LoraMethodConfig.modes == ("images", "tail")
    assert "lora" in methods.METHOD_NAMES and "full" in methods.METHOD_NAMES


def test_full_fine_tuning() -> None:
    vit = small_vit()
    model = methods.build(FullConfig(), vit, 5, None)
    assert isinstance(model, FullFineTune)
    assert all(p.requires_grad for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert model.side_parameters() == total - head
    assert model.trainable_state().keys() == model.state_dict().keys()
    assert model.merge() is vit
    assert FullConfig.modes == ("images",)
    with pytest.raises(ValueError, match="images only"):
        methods.build(FullConfig(), small_vit(), 5, 2)
