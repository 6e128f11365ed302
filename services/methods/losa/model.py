"""LoSA side network (Mercea et al., CVPR 2024, Eq. 3-5), as DESIGN.md reads the paper.

a_0 = z_L (the last block's output); a_l = a_{l-1} + g_l(z_l + a_{l-1}) over the selected layers in order;
g(x) = s * W_up GeLU(W_down x + b_down) + b_up, along channels for the 1st, 3rd, ... side layer and along
tokens for the 2nd, 4th, ... (MLP-Mixer). W_up and b_up start at zero, so step 0 equals the linear probe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.methods.losa.config import LosaConfig
from services.methods.losa.mlp import LowRankMLP
from services.methods.losa.video import VideoLosaSideNetwork
from services.methods.readout import Classifier, FeatureInfo, Readout


class LosaSideNetwork(Classifier):
    own_activations = True

    def __init__(self, config: LosaConfig, info: FeatureInfo) -> None:
        super().__init__()
        self.side_layers = config.select_layers(info.num_layers)
        last = info.num_layers - 1
        self.input_layers = sorted(set(self.side_layers) | {last})
        self._slot = {layer: i for i, layer in enumerate(self.input_layers)}
        # side layer i (0-based) mixes channels when i is even (l = i + 1 odd), tokens when i is odd.
        self.mixers = nn.ModuleList(
            LowRankMLP(info.dim if i % 2 == 0 else info.tokens, config.rank) for i in range(len(self.side_layers))
        )
        self.readout = Readout(info, config.pool)
        self.head = nn.Linear(info.dim, info.num_classes)

    def refine(self, feats: torch.Tensor) -> torch.Tensor:
        """The side network's output a_L, [B, T, D]."""
        # one layer at a time to float32 (a float16 cache), not the whole [B, L, T, D] input at once; the add
        # promotes the float16 layer as it reads it
        a = feats[:, self._slot[self.input_layers[-1]]].float()
        for i, (layer, g) in enumerate(zip(self.side_layers, self.mixers, strict=True)):
            a = g.add_to(a, torch.add(a, feats[:, self._slot[layer]]), over_tokens=i % 2 == 1)
        return a

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.readout(self.refine(feats)))

    def forward_stacked(self, params: dict[str, torch.Tensor], feats: torch.Tensor) -> torch.Tensor:
        """K configurations of this architecture at once (a sweep over lr and weight decay, services/training/sweeps/):
        `params` as `named_parameters()` names them, each with a leading axis of K; `feats` [B, L, T, D] shared by
        all. Returns logits [K, B, C], each equal to the forward of a network with those parameters (tested). Every
        layer runs as one batched matrix product for the K networks, and what the K share is computed once: each
        side layer projects its input z_l + a down as W z_l + W a, the first term for all K in one product, so z_l
        is read once per layer instead of added to K residual streams (torch.vmap would run decomposed, slower
        kernels)."""
        k = params["head.weight"].shape[0]
        a = feats[:, self._slot[self.input_layers[-1]]].float()  # [B, T, D], shared until the first side layer
        for i, layer in enumerate(self.side_layers):
            p = {n: params[f"mixers.{i}.{n}"] for n in ("down.weight", "down.bias", "up.weight", "up.bias", "scale")}
            a = _stacked_add(a, feats[:, self._slot[layer]].float(), p, k, over_tokens=i % 2 == 1)
        b, t, d = a.shape[1:]
        pooled = self.readout(a.reshape(k * b, t, d)).view(k, b, d)
        return torch.baddbmm(params["head.bias"][:, None], pooled, params["head.weight"].transpose(1, 2))


def build(config: LosaConfig, info: FeatureInfo) -> nn.Module:
    """The image side network, or for a ViViT's tokens (`info.temporal`) the video one of Eq. 6 (video.py)."""
    if info.temporal is not None and info.token_mode == "all":
        return VideoLosaSideNetwork(config, info)
    return LosaSideNetwork(config, info)


def _stacked_add(
    a: torch.Tensor, z: torch.Tensor, p: dict[str, torch.Tensor], k: int, over_tokens: bool
) -> torch.Tensor:
    """`LowRankMLP.add_to(a, a + z)` for K stacked parameter sets: a [K, B, T, D] or (shared by all K) [B, T, D], z
    [B, T, D] shared by all K. The down-projection W (a + z) is computed as W z (one product for the K) + W a."""
    b, t, d = z.shape
    w_up = torch.cat([p["scale"][:, None, None] * p["up.weight"], p["up.bias"][:, :, None]], dim=2)  # [K, n, r+1]
    r = p["down.weight"].shape[1]
    if not over_tokens:
        w_down = p["down.weight"].flatten(0, 1)  # [K r, D]
        if a.dim() == 3:  # the first side layer: a is shared too, so W (a + z) is one product for the K
            h = F.linear((a + z).reshape(b * t, d), w_down, p["down.bias"].flatten())
            h = h.view(b * t, k, r).transpose(0, 1)  # [K, B T, r]
        else:
            hz = F.linear(z.reshape(b * t, d), w_down, p["down.bias"].flatten()).view(b * t, k, r).transpose(0, 1)
            h = torch.baddbmm(hz, a.reshape(k, b * t, d), p["down.weight"].transpose(1, 2))  # [K, B T, r]
        h = F.pad(F.gelu(h), (0, 1), value=1.0)  # [K, B T, r+1]
        return _plus_low_rank(a.reshape(-1, b * t, d).expand(k, -1, -1), h, w_up.transpose(1, 2)).view(k, b, t, d)
    # along tokens: per configuration and image, W [r, T] x [T, D]; W z_b for the K at once, as [K r, T] x [T, D]
    hz = torch.baddbmm(
        p["down.bias"].reshape(1, k * r, 1), p["down.weight"].reshape(1, k * r, t).expand(b, -1, -1), z
    )  # [B, K r, D]
    hz = hz.view(b, k, r, d).transpose(0, 1).reshape(k * b, r, d)
    w_down = p["down.weight"][:, None].expand(k, b, r, t).reshape(k * b, r, t)
    a = a.expand(k, b, t, d).reshape(k * b, t, d)
    h = F.pad(F.gelu(torch.baddbmm(hz, w_down, a)), (0, 0, 0, 1), value=1.0)  # [K B, r+1, D]
    w_up = w_up[:, None].expand(k, b, t, r + 1).reshape(k * b, t, r + 1)
    return _plus_low_rank(a, w_up, h).view(k, b, t, d)


def _plus_low_rank(a: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """a + m1 @ m2 (batched), in one GEMM; under autocast the product is added to a in float32, so the residual
    stream keeps its precision."""
    if torch.is_autocast_enabled(a.device.type):
        return a + torch.bmm(m1, m2).float()
    return torch.baddbmm(a, m1, m2)
