"""ARC: parameter count against the paper, step-0 identity, merge equality, tail mode, saving and gradients."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from pydantic import ValidationError

from services import methods
from services.methods.arc.config import ArcConfig
from services.methods.arc.model import AdaptedNorm, Arc, ArcAdapter

NUM_CLASSES = 5


def tiny_vit(**kwargs) -> torch.nn.Module:
    """timm's 6-block, 64-dim test ViT (160 px, 101 tokens), randomly initialised and fixed by the seed."""
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=0, **kwargs).eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 160, 160, generator=torch.Generator().manual_seed(1))


def build(vit: torch.nn.Module, tail_blocks: int | None = None, **options) -> Arc:
    model = methods.build(ArcConfig(**options), vit, NUM_CLASSES, tail_blocks)
    assert isinstance(model, Arc)
    return model


def adapters(model: Arc) -> list[ArcAdapter]:
    return [m for m in model.modules() if isinstance(m, ArcAdapter)]


@torch.no_grad()
def randomize(model: Arc, seed: int = 2) -> None:
    """Trained-looking scales, biases and head (they start at zero, which would make merge tests trivial)."""
    g = torch.Generator().manual_seed(seed)
    model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g))
    model.head.bias.copy_(0.1 * torch.randn(model.head.bias.shape, generator=g))
    for a in adapters(model):
        a.scale.copy_(torch.randn(a.scale.shape, generator=g))
        a.bias.copy_(0.1 * torch.randn(a.bias.shape, generator=g))


@pytest.mark.parametrize(("tail_blocks", "expected"), [(None, 96_432), (2, 76_800 + 2 * 1_636)])
def test_parameters_vit_b16_on_meta(tail_blocks: int | None, expected: int) -> None:
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        model = build(vit, tail_blocks)
    assert model.basis.u_attn.is_meta and adapters(model)[0].scale.is_meta
    assert model.side_parameters() == expected  # U counted once although every block uses it


def test_config_defaults_and_validation() -> None:
    config = ArcConfig()
    assert (config.rank, config.dropout) == (50, 0.1)
    assert methods.CONFIGS["arc"] is ArcConfig and ArcConfig.kind == "adapted" and ArcConfig.modes[0] == "images"
    assert config.training_defaults() == {
        "optimizer": "adamw",
        "lr": 1e-2,
        "weight_decay": 0.0,
        "warmup_epochs": 10.0,
        "clip_grad_norm": 1.0,
    }
    for bad in ({"rank": 0}, {"dropout": 1.0}, {"dropout": -0.1}, {"alpha": 1}):
        with pytest.raises(ValidationError):
            ArcConfig(**bad)


def test_rank_above_embedding_dim_is_a_clear_error() -> None:
    vit = tiny_vit()
    with pytest.raises(ValueError, match=r"method\.rank \(65\) must not exceed .*embedding dimension \(64\)"):
        build(vit, rank=65)
    assert vit.blocks[0].attn.qkv.weight.requires_grad  # rejected before the backbone was touched
    assert build(tiny_vit(), rank=64).basis.u_mlp.shape == (64, 64)


@pytest.mark.parametrize("train", [False, True])
def test_step_zero_equals_the_pretrained_model(train: bool) -> None:
    vit = tiny_vit()
    reference = copy.deepcopy(vit)
    model = build(vit).train(train)
    assert all(a.dropout.p == 0.1 for a in adapters(model))
    x = images()
    with torch.no_grad():
        assert torch.equal(model.vit.forward_features(x), reference.forward_features(x))


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_merge_folds_into_qkv_and_fc1(qkv_bias: bool) -> None:
    vit = tiny_vit(qkv_bias=qkv_bias)
    pretrained = copy.deepcopy(vit)
    model = build(vit).eval()
    randomize(model)
    x = images()
    with torch.no_grad():
        adapted = model(x)
        merged = model.merge()
        out = merged(x)
        assert not torch.allclose(merged.forward_features(x), pretrained.forward_features(x), atol=1e-2)
    torch.testing.assert_close(out, adapted, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, AdaptedNorm | ArcAdapter) for m in merged.modules())
    plain = timm.create_model("test_vit", pretrained=False, num_classes=NUM_CLASSES, qkv_bias=True)
    # no extra cost: the plain ViT's parameters (a bias-less qkv gains the bias that b folds into)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in plain.parameters())
    assert not any(p.requires_grad for name, p in merged.named_parameters() if not name.startswith("head."))


def test_tail_mode_adapts_the_last_blocks_on_cached_activations() -> None:
    model = build(tiny_vit(), tail_blocks=2).eval()
    num_layers = len(model.vit.blocks)
    assert model.input_layers == [num_layers - 3]
    for i, block in enumerate(model.vit.blocks):
        adapted = i >= num_layers - 2
        assert isinstance(block.norm1, AdaptedNorm) == adapted and isinstance(block.norm2, AdaptedNorm) == adapted
    assert len(adapters(model)) == 4 and all(a.u is model.basis.u_attn for a in adapters(model)[::2])
    assert model.side_parameters() == 2 * 64 * 50 + 2 * (2 * 50 + 2 * 64)
    randomize(model)
    x = images()
    with torch.no_grad():
        spatial, prefix = model.vit.forward_intermediates(
            x,
            indices=model.input_layers,
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )[0]
        cached = torch.cat([prefix, spatial], dim=1).unsqueeze(1)
        torch.testing.assert_close(model(cached), model.vit(x), atol=1e-5, rtol=1e-5)
        merged = model.merge()
        torch.testing.assert_close(merged(x), model.vit(x), atol=1e-4, rtol=1e-4)


def test_trainable_state_round_trip() -> None:
    vit = tiny_vit()
    model = build(copy.deepcopy(vit)).eval()
    randomize(model)
    state = {k: v.clone() for k, v in model.trainable_state().items()}
    assert not set(state) & model.frozen_names()
    assert sum("u_attn" in k for k in state) == 1 and sum("u_mlp" in k for k in state) == 1
    assert all(k.startswith(("basis.", "head.", "vit.head.")) or ".adapter." in k for k in state)
    assert sum(".adapter.scale" in k for k in state) == 2 * len(vit.blocks)

    torch.manual_seed(123)  # a different U and head
    fresh = build(copy.deepcopy(vit)).eval()
    x = images()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), model(x))
        fresh.load_trainable(state)
        assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="do not fit"):
        fresh.load_trainable({**state, "basis.u_other": state["basis.u_attn"]})


def test_gradients_reach_only_u_s_b_and_the_head() -> None:
    model = build(tiny_vit()).train()
    x = images()
    (model(x) - 1).square().mean().backward()  # away from the zero output of the zero head
    # at step 0 the head is zero (as in the official code), so only the head gets a gradient: s and b reach the
    # output through it, and U through s
    assert model.head.weight.grad.abs().sum() > 0
    assert all(
        torch.count_nonzero(a.scale.grad) == 0 and torch.count_nonzero(a.bias.grad) == 0 for a in adapters(model)
    )
    assert torch.count_nonzero(model.basis.u_attn.grad) == 0

    model.zero_grad()
    randomize(model)  # after a step, s != 0
    model(x).square().mean().backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {"basis.u_attn", "basis.u_mlp", "vit.head.weight", "vit.head.bias"}  # the head under its first name
    blocks = [f"vit.blocks.{i}.{norm}.adapter." for i in range(6) for norm in ("norm1", "norm2")]
    expected |= {prefix + p for prefix in blocks for p in ("scale", "bias")}
    assert trainable == expected
    for name, p in model.named_parameters():
        if name in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
