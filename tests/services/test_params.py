"""Parameter counts on the meta device (services.params): LoSA against the paper, other registered methods,
and the errors for a bad backbone, method or option."""

from __future__ import annotations

import time

import pytest

from services.params import count_parameters

VIT_B, VIT_G = "vit_base_patch16_224", "vit_giant_patch14_224"


@pytest.mark.parametrize(("rank", "expected"), [(16, 191_262), (8, 98_526), (4, 52_158)])
def test_losa_vit_b16_matches_the_paper(rank: int, expected: int) -> None:
    n = count_parameters(VIT_B, "losa", {"rank": rank})
    assert (n.num_layers, n.tokens, n.dim) == (12, 197, 768)
    assert n.scalars == 12  # one learnable scale per side layer, which the paper does not count
    assert n.side == expected + n.scalars
    assert n.classifier == 768 * 10 + 10
    assert n.total == n.backbone_params + n.side + n.classifier


def test_losa_vit_g14_costs_no_memory() -> None:
    start = time.perf_counter()
    n = count_parameters(VIT_G, "losa", {"rank": 64})
    assert time.perf_counter() - start < 30  # meta tensors: no 1B-parameter allocation
    assert (n.num_layers, n.tokens, n.dim) == (40, 257, 1408)
    assert n.backbone_params > 1_000_000_000
    assert (n.side - n.scalars, n.scalars) == (4_298_260, 40)


@pytest.mark.parametrize(("layers", "expected"), [(8, 861_000), (4, 431_000), (2, 217_000)])
def test_losa_vit_g14_fewer_layers(layers: int, expected: int) -> None:
    n = count_parameters(VIT_G, "losa", {"rank": 64, "layers": layers})
    assert n.scalars == layers
    assert n.side - n.scalars == pytest.approx(expected, rel=0.01)


def test_linear_probe_trains_only_its_classifier() -> None:
    n = count_parameters(VIT_B, "linear", {}, num_classes=100)
    assert (n.side, n.classifier) == (0, 768 * 100 + 100)


def test_image_size_changes_the_tokens() -> None:
    n = count_parameters(VIT_B, "losa", {"rank": 4}, image_size=384)
    assert n.tokens == 24 * 24 + 1


@pytest.mark.parametrize(("method", "rank", "expected"), [("apla", 8, 73_824), ("arc", 50, 96_432)])
def test_adapted_methods_vit_b16(method: str, rank: int, expected: int) -> None:
    assert count_parameters(VIT_B, method, {"rank": rank}).side == expected


def test_tail_blocks_adapt_only_the_last_blocks() -> None:
    assert count_parameters(VIT_B, "apla", {"rank": 8}, tail_blocks=2).side == 8 * 769 * 2


def test_bad_backbone_method_or_option_name_the_cause() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*losa"):
        count_parameters(VIT_B, "nope", {})
    with pytest.raises(ValueError, match=r"unknown backbone 'vit_base_patch16_225'.*vit_base_patch16_224"):
        count_parameters("vit_base_patch16_225", "losa", {})
    with pytest.raises(ValueError, match=r"method 'linear': rank: Extra inputs.*options: pool"):
        count_parameters(VIT_B, "linear", {"rank": 4})
    with pytest.raises(ValueError, match=r"method 'losa': rank: Input should be greater than or equal to 1"):
        count_parameters(VIT_B, "losa", {"rank": 0})
    with pytest.raises(ValueError, match="layers .20. do not exist"):
        count_parameters(VIT_B, "losa", {"layers": [20]})
    with pytest.raises(ValueError, match="no tail mode"):
        count_parameters(VIT_B, "losa", {}, tail_blocks=2)
    with pytest.raises(ValueError, match="not an option"):
        count_parameters(VIT_B, "losa", {"name": "linear"})
