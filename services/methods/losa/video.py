"""LoSA on video (Mercea et al., CVPR 2024, sec. 3.2 "Extending to video", Eq. 6).

A ViViT's tokens are a class token and a T' x S grid (T' temporal, S spatial positions, time-major). Channel-mixing
side layers are the image ones, over every token. A token-mixing side layer factorises the token axis: a low-rank
MLP along the S spatial positions (one for every temporal index) and one along the T' temporal positions (one for
every spatial position), summed, g(x) = g_S(x) + g_T(x), both reading the same x = z_l + a_{l-1}. The class token is
not on the grid: channel layers update it, token layers leave it. Parameters of a token layer:
(2 S r + r + S + 1) + (2 T' r + r + T' + 1); ViT-B/16 at 16 frames, tubelet 2, r 16: 6,485 + 281.

The paper's Table 2 counts (3.61M for ViViT-H ... 8.03M for ViViT-e at r 64, 32 frames, tubelet 2) lie about
317 x D above Eq. 6 for every reading of it we tried (tests/services/video/test_losa_video.py pins our formula).

The residual stream is held as the class token(s) [B, P, D] and the grid [B, T' S, D], each contiguous, so both
mixers run on views of the grid without a transposed copy: the spatial one as W [r, S] times [S, D] for each of the
B T' frames of tokens, the temporal one as W [r, T'] times [T', S D] for each clip (`LowRankMLP.add_to`, fused).
"""

from __future__ import annotations

import torch
from torch import nn

from services.methods.losa.config import LosaConfig
from services.methods.losa.mlp import LowRankMLP
from services.methods.readout import Classifier, FeatureInfo, Readout


class SpatioTemporalMixer(nn.Module):
    """Eq. 6 on a grid [B, T' S, D]: g(x) = g_S(x) + g_T(x)."""

    def __init__(self, temporal: int, spatial: int, rank: int) -> None:
        super().__init__()
        self.temporal_positions, self.spatial_positions = temporal, spatial
        self.spatial = LowRankMLP(spatial, rank)
        self.temporal = LowRankMLP(temporal, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """g(x) as the paper writes it, each MLP on its axis moved last: the reference `add_to` is tested against."""
        b, n, d = x.shape
        grid = x.view(b, self.temporal_positions, self.spatial_positions, d)
        along_s = self.spatial(grid.transpose(2, 3)).transpose(2, 3)  # [B, T', D, S] -> back
        along_t = self.temporal(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # [B, S, D, T'] -> back
        return (along_s + along_t).reshape(b, n, d)

    def add_to(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """a + g(x) for contiguous grids a, x [B, T' S, D], through views: the spatial MLP as a batch of B T'
        [S, D] matrices, the temporal one as a batch of B [T', S D] matrices; fused as `LowRankMLP.add_to`."""
        b, n, d = x.shape
        t, s = self.temporal_positions, self.spatial_positions
        out = self.spatial.add_to(a.view(b * t, s, d), x.view(b * t, s, d), over_tokens=True)
        return self.temporal.add_to(out.view(b, t, s * d), x.view(b, t, s * d), over_tokens=True).view(b, n, d)


class VideoLosaSideNetwork(Classifier):
    """a_0 = z_L; a_l = a_{l-1} + g_l(z_l + a_{l-1}), channel mixing on the 1st, 3rd, ... side layer and Eq. 6 on
    the 2nd, 4th, ...; W_up and b_up start at zero, so step 0 equals the linear probe (mean of patch tokens)."""

    own_activations = True

    def __init__(self, config: LosaConfig, info: FeatureInfo) -> None:
        super().__init__()
        self.side_layers = config.select_layers(info.num_layers)
        self.input_layers = sorted(set(self.side_layers) | {info.num_layers - 1})
        self._slot = {layer: i for i, layer in enumerate(self.input_layers)}
        self.prefix = info.num_prefix_tokens
        temporal = info.temporal
        spatial, rest = divmod(info.tokens - self.prefix, temporal)
        if rest:
            raise ValueError(f"{info.tokens - self.prefix} patch tokens do not form {temporal} temporal positions")
        self.mixers = nn.ModuleList(
            LowRankMLP(info.dim, config.rank) if i % 2 == 0 else SpatioTemporalMixer(temporal, spatial, config.rank)
            for i in range(len(self.side_layers))
        )
        self.readout = Readout(info, config.pool)
        self.head = nn.Linear(info.dim, info.num_classes)

    def refine(self, feats: torch.Tensor) -> torch.Tensor:
        """The side network's output a_L, [B, T, D] (class token first)."""
        p = self.prefix
        last = feats[:, self._slot[self.input_layers[-1]]]
        cls, grid = (last[:, :p].float().contiguous(), last[:, p:].float().contiguous())  # float32, own memory
        for i, (layer, g) in enumerate(zip(self.side_layers, self.mixers, strict=True)):
            z = feats[:, self._slot[layer]]
            x_grid = torch.add(grid, z[:, p:])  # a new contiguous tensor: the mixers' views need one
            if i % 2 == 0:
                grid = g.add_to(grid, x_grid, over_tokens=False)
                if p:
                    cls = g.add_to(cls, torch.add(cls, z[:, :p]), over_tokens=False)
            else:
                grid = g.add_to(grid, x_grid)  # the class token is not on the grid: left as it is
        return torch.cat([cls, grid], dim=1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.readout(self.refine(feats)))
