"""APLA: parameter counts against the paper, exact step 0, seeded rows, frozen rows stay frozen, merge,
tail mode on cached activations, the save/load cycle, and a clear error for too large a rank."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from pydantic import ValidationError
from torch import nn

from services import methods
from services.methods.apla.config import AplaConfig
from services.methods.apla.model import Apla, PartialLinear


def vit() -> nn.Module:
    """A small random-init timm ViT (6 blocks, dim 64), in eval mode so forwards are deterministic."""
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False).eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 160, 160, generator=torch.Generator().manual_seed(1))


def perturb(model: Apla) -> None:
    """Random trained rows, as if after training."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen))


def partials(model: Apla) -> dict[int, PartialLinear]:
    return {i: b.attn.proj for i, b in enumerate(model.vit.blocks) if isinstance(b.attn.proj, PartialLinear)}


@pytest.mark.parametrize(("rank", "expected"), [(8, 73_824), (32, 295_296), (128, 1_181_184)])
def test_parameters_vit_b16(rank: int, expected: int) -> None:
    with torch.device("meta"):
        backbone = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        model = methods.build(AplaConfig(rank=rank), backbone, 100, None)
    assert isinstance(model, Apla)
    assert model.side_parameters() == expected == rank * 769 * 12


def test_config_validates() -> None:
    assert methods.CONFIGS["apla"] is AplaConfig
    assert AplaConfig.kind == "adapted" and AplaConfig.modes[0] == "images"
    with pytest.raises(ValidationError):
        AplaConfig(rank=0)
    with pytest.raises(ValidationError):
        AplaConfig(rows=3)


def test_step_zero_equals_pretrained() -> None:
    original = vit()
    model = methods.build(AplaConfig(rank=4), copy.deepcopy(original), 10, None)
    x = images()
    with torch.no_grad():
        assert torch.equal(model.vit.forward_features(x), original.forward_features(x))


def test_rows_are_seeded_and_only_they_train() -> None:
    def rows(seed: int) -> list[torch.Tensor]:
        return [p.rows for p in partials(methods.build(AplaConfig(rank=4, subset_seed=seed), vit(), 10, None)).values()]

    assert all(torch.equal(a, b) for a, b in zip(rows(0), rows(0), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(rows(0), rows(1), strict=True))
    first = rows(0)
    assert any(not torch.equal(first[0], r) for r in first[1:])  # blocks draw their own rows

    original = vit()
    model = methods.build(AplaConfig(rank=4, subset_seed=3), copy.deepcopy(original), 10, None)
    for proj in partials(model).values():
        assert proj.rows.dtype == torch.int64 and len(proj.rows.unique()) == 4
        assert proj.weight_rows.shape == (4, 64) and proj.bias_rows.shape == (4,)
        assert not proj.weight.requires_grad and not proj.bias.requires_grad
    # the head is registered twice (model.head is model.vit.head): compare by identity, not by name
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    rows = [p for proj in partials(model).values() for p in (proj.weight_rows, proj.bias_rows)]
    assert trainable == {id(p) for p in [*rows, model.head.weight, model.head.bias]}

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = nn.functional.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    for i, proj in partials(model).items():
        assert proj.weight.grad is None and proj.bias.grad is None
        pretrained = original.blocks[i].attn.proj
        frozen = torch.ones(64, dtype=torch.bool)
        frozen[proj.rows] = False
        weight, bias = proj.merged_weight().detach(), proj.merged_bias().detach()
        assert torch.equal(weight[frozen], pretrained.weight[frozen])
        assert torch.equal(bias[frozen], pretrained.bias[frozen])
        assert not torch.equal(weight[~frozen], pretrained.weight[~frozen])  # the chosen rows did train
    # every frozen backbone weight, proj.weight included (same names as in timm), is untouched
    pretrained_state = original.state_dict()
    frozen_blocks = [(n, p) for n, p in model.vit.named_parameters() if n.startswith("blocks.") and not p.requires_grad]
    assert len(frozen_blocks) == len([n for n in pretrained_state if n.startswith("blocks.")])
    assert all(torch.equal(p, pretrained_state[n]) for n, p in frozen_blocks)


def test_merge_equals_unmerged() -> None:
    model = methods.build(AplaConfig(rank=8), vit(), 10, None)
    perturb(model)
    x = images()
    with torch.no_grad():
        unmerged = model(x)
        merged = model.merge()
        assert torch.allclose(merged(x), unmerged, atol=1e-5)
    assert all(type(b.attn.proj) is nn.Linear for b in merged.blocks)
    assert not any(isinstance(m, PartialLinear) for m in merged.modules())


def test_tail_mode_on_cached_activations() -> None:
    model = methods.build(AplaConfig(rank=4), vit(), 10, 2)
    num_layers = len(model.vit.blocks)
    assert sorted(partials(model)) == [num_layers - 2, num_layers - 1]
    assert all(type(b.attn.proj) is nn.Linear for b in model.vit.blocks[: num_layers - 2])
    assert model.input_layers == [num_layers - 3]
    assert model.side_parameters() == 2 * 4 * 65

    # tail mode draws the same rows as images mode for the same blocks
    full = partials(methods.build(AplaConfig(rank=4), vit(), 10, None))
    assert all(torch.equal(p.rows, full[i].rows) for i, p in partials(model).items())

    perturb(model)
    x = images()
    with torch.no_grad():
        ((spatial, prefix),) = model.vit.forward_intermediates(
            x,
            indices=model.input_layers,
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )
        cached = torch.cat([prefix, spatial], dim=1).unsqueeze(1)  # [B, 1, T, D], as the cache holds it
        assert torch.allclose(model(cached), model.vit(x), atol=1e-5)  # the full image forward


def test_save_and_load_reproduce_the_logits() -> None:
    config = AplaConfig(rank=4, subset_seed=5)
    model = methods.build(config, vit(), 10, None)
    perturb(model)
    state = model.trainable_state()
    assert {k for k in state if k.startswith("vit.blocks.0.")} == {
        f"vit.blocks.0.attn.proj.{k}" for k in ("rows", "weight_rows", "bias_rows")
    }
    assert {"vit.head.weight", "vit.head.bias"} <= set(state)
    assert not set(state) & model.frozen_names()
    assert not any(k.endswith("proj.weight") or k.endswith("qkv.weight") for k in state)

    # a model built with another seed takes the saved rows, not its own
    fresh = methods.build(config.model_copy(update={"subset_seed": 6}), vit(), 10, None)
    fresh.load_trainable(state)
    x = images()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="do not fit"):
        fresh.load_trainable({**state, "stray": torch.zeros(1)})


def test_rank_larger_than_embed_dim() -> None:
    backbone = vit()
    with pytest.raises(ValueError, match=r"method\.rank 65 .* 64"):
        methods.build(AplaConfig(rank=65), backbone, 10, None)
    assert type(backbone.blocks[0].attn.proj) is nn.Linear and backbone.num_classes == 1000  # left untouched
    assert methods.build(AplaConfig(rank=64), backbone, 10, None).side_parameters() == 6 * 64 * 65
