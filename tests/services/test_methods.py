"""Methods: LoSA parameter counts against the paper, step-0 equivalence with a linear probe, spec validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from services import methods
from services.methods.linear.config import LinearConfig
from services.methods.losa.config import LosaConfig
from services.methods.losa.mlp import LowRankMLP
from services.methods.losa.model import LosaSideNetwork
from services.methods.readout import FeatureInfo
from services.spec import JobSpec


def info(num_layers: int, tokens: int, dim: int, num_classes: int = 10, readout: dict | None = None) -> FeatureInfo:
    return FeatureInfo(
        num_layers=num_layers,
        tokens=tokens,
        dim=dim,
        num_prefix_tokens=1,
        global_pool="token",
        norm_eps=1e-6,
        num_classes=num_classes,
        readout=readout or {},
    )


def losa_params(num_layers: int, tokens: int, dim: int, rank: int, layers="all") -> int:
    """Side parameters without the one scalar scale per mixer (the paper does not count it)."""
    with torch.device("meta"):
        model = methods.build(LosaConfig(rank=rank, layers=layers), info(num_layers, tokens, dim))
    assert isinstance(model, LosaSideNetwork)
    return model.side_parameters() - len(model.mixers)


@pytest.mark.parametrize(("rank", "expected"), [(16, 191_262), (8, 98_526), (4, 52_158)])
def test_losa_parameters_vit_b16(rank: int, expected: int) -> None:
    assert losa_params(12, 197, 768, rank) == expected


def test_losa_parameters_vit_g14() -> None:
    assert losa_params(40, 257, 1408, 64) == 4_298_260


@pytest.mark.parametrize(("n", "expected"), [(8, 861_000), (4, 431_000), (2, 217_000)])
def test_losa_parameters_vit_g14_fewer_layers(n: int, expected: int) -> None:
    assert losa_params(40, 257, 1408, 64, layers=n) == pytest.approx(expected, rel=0.01)


def test_losa_layer_selection() -> None:
    assert LosaConfig(layers=4).select_layers(40) == [9, 19, 29, 39]
    assert LosaConfig(layers=2).select_layers(12) == [5, 11]
    assert LosaConfig(layers=100).select_layers(6) == list(range(6))
    assert LosaConfig(layers=[3, 1]).select_layers(6) == [1, 3]
    with pytest.raises(ValueError, match="do not exist"):
        LosaConfig(layers=[6]).select_layers(6)
    model = methods.build(LosaConfig(rank=2, layers=[1, 3]), info(6, 5, 8))
    assert model.input_layers == [1, 3, 5]  # the last layer is always read (a_0 = z_L)
    assert len(model.mixers) == 2
    assert methods.build(LinearConfig(), info(6, 5, 8)).input_layers == [5]


def test_losa_at_step_zero_equals_linear_probe() -> None:
    rng = np.random.default_rng(0)
    readout = {
        "norm.weight": rng.standard_normal(8).astype(np.float32),
        "norm.bias": rng.standard_normal(8).astype(np.float32),
    }
    fi = info(num_layers=4, tokens=5, dim=8, num_classes=3, readout=readout)
    torch.manual_seed(0)
    linear = methods.build(LinearConfig(), fi)
    losa = methods.build(LosaConfig(rank=4), fi)
    losa.head.load_state_dict(linear.head.state_dict())
    feats = torch.randn(6, 4, 5, 8)
    expected = linear(feats[:, [3]])
    torch.testing.assert_close(losa(feats), expected, rtol=0, atol=1e-6)
    # the side network is not a no-op once W_up is trained
    with torch.no_grad():
        losa.mixers[0].up.weight.normal_()
    assert not torch.allclose(losa(feats), expected, atol=1e-3)


@pytest.mark.parametrize("over_tokens", [False, True])
def test_fused_mixer_equals_the_papers_form(over_tokens: bool) -> None:
    """`add_to` (scale, bias and residual folded into the GEMMs) is a + g(x) of Eq. 3-5, values and gradients."""
    torch.manual_seed(0)
    g = LowRankMLP(7 if over_tokens else 12, rank=3)
    with torch.no_grad():
        g.up.weight.normal_(), g.up.bias.normal_(), g.scale.fill_(0.7)
    a, x = torch.randn(2, 7, 12), torch.randn(2, 7, 12)
    expected = a + (g(x.transpose(1, 2)).transpose(1, 2) if over_tokens else g(x))
    grads = torch.autograd.grad(expected.square().sum(), list(g.parameters()))
    fused = g.add_to(a, x, over_tokens=over_tokens)
    torch.testing.assert_close(fused, expected)
    for got, want in zip(torch.autograd.grad(fused.square().sum(), list(g.parameters())), grads, strict=True):
        torch.testing.assert_close(got, want)


def test_losa_under_bf16_autocast_keeps_the_residual_stream_in_float32() -> None:
    """Under autocast the low-rank GEMMs run in bf16 but a_l stays float32: at step 0 a_L is z_L exactly, so LoSA
    equals the linear probe (a fused addmm would round z_L to bf16 at every side layer), and once trained a_L is
    within bf16 rounding of the float32 paper form a + g(x)."""
    rng = np.random.default_rng(0)
    readout = {
        "norm.weight": rng.standard_normal(16).astype(np.float32),
        "norm.bias": rng.standard_normal(16).astype(np.float32),
    }
    fi = info(num_layers=6, tokens=9, dim=16, num_classes=3, readout=readout)
    torch.manual_seed(0)
    linear = methods.build(LinearConfig(), fi)
    losa = methods.build(LosaConfig(rank=4), fi)
    losa.head.load_state_dict(linear.head.state_dict())
    feats = torch.randn(5, 6, 9, 16) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a_l, logits, probe = losa.refine(feats), losa(feats), linear(feats[:, [5]])
    assert a_l.dtype == torch.float32
    torch.testing.assert_close(a_l, feats[:, 5], rtol=0, atol=0)
    torch.testing.assert_close(logits.float(), probe.float(), rtol=1e-6, atol=0)

    with torch.no_grad():
        for g in losa.mixers:
            g.up.weight.normal_(0, 0.5), g.up.bias.normal_(0, 0.5)
    # the float32 paper form: a_l = a_{l-1} + g_l(z_l + a_{l-1}), g along channels, then tokens, ...
    a = feats[:, losa._slot[5]]
    for i, (layer, g) in enumerate(zip(losa.side_layers, losa.mixers, strict=True)):
        x = a + feats[:, losa._slot[layer]]
        a = a + (g(x.transpose(1, 2)).transpose(1, 2) if i % 2 else g(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = losa.refine(feats)
    assert got.dtype == torch.float32
    rel = ((got - a).norm() / a.norm()).item()
    assert 0 < rel < 1e-2, rel  # bf16 GEMMs: a few 1e-3, never the 0.2 of a stream rounded at every layer


def test_readout_uses_the_backbone_norm() -> None:
    fi = info(
        num_layers=2,
        tokens=3,
        dim=4,
        num_classes=2,
        readout={"norm.weight": np.full(4, 2.0, np.float32), "norm.bias": np.ones(4, np.float32)},
    )
    probe = methods.build(LinearConfig(), fi)
    feats = torch.randn(2, 1, 3, 4)
    normed = torch.nn.functional.layer_norm(feats[:, 0], (4,), eps=1e-6) * 2 + 1
    torch.testing.assert_close(probe.readout(feats[:, 0]), normed[:, 0])  # cls token pooling
    mean_probe = methods.build(LinearConfig(pool="mean"), fi)
    torch.testing.assert_close(mean_probe.readout(feats[:, 0]), normed[:, 1:].mean(1))
    assert probe.side_parameters() == 0  # norms are frozen buffers
    assert "readout.norm_weight" in probe.state_dict()


BASE = {"dataset": {"path": "/data/x"}, "backbone": {"name": "test_vit", "pretrained": False}}


def test_spec_union_rejects_rank_zero_naming_the_field() -> None:
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate({**BASE, "method": {"name": "losa", "rank": 0}})
    locs = [e["loc"] for e in err.value.errors()]
    assert any(loc[-1] == "rank" and "losa" in loc for loc in locs), locs
    assert "rank" in str(err.value)


def test_spec_union_selects_the_method_by_name() -> None:
    spec = JobSpec.model_validate({**BASE, "method": {"name": "losa", "rank": 4, "layers": 2}})
    assert isinstance(spec.method, LosaConfig)
    assert (spec.method.rank, spec.method.layers) == (4, 2)
    assert isinstance(JobSpec.model_validate({**BASE, "method": {"name": "linear"}}).method, LinearConfig)
    adapter = TypeAdapter(methods.MethodConfig)
    with pytest.raises(ValidationError):
        adapter.validate_python({"name": "nope"})
    with pytest.raises(ValidationError):
        adapter.validate_python({"name": "linear", "rank": 4})  # extra fields are forbidden
    with pytest.raises(ValidationError, match="layer count"):
        adapter.validate_python({"name": "losa", "layers": 0})
    assert set(methods.METHOD_NAMES) >= {"linear", "losa"}
