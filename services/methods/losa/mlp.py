"""LoSA's side layer g(x) (Mercea et al., CVPR 2024, Eq. 4-5): a low-rank MLP along one axis, which the image side
network (model.py) applies along channels and tokens, and the video one (video.py) along channels, space and time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRankMLP(nn.Module):
    """g(x) = s * W_up GeLU(W_down x + b_down) + b_up on the last dimension (size n)."""

    def __init__(self, n: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(n, rank)
        self.up = nn.Linear(rank, n)
        self.scale = nn.Parameter(torch.ones(()))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """g(x) as the paper writes it: the reference `add_to` (what the side network runs) is tested against."""
        # s scales W_up x only; b_up is added after, as in g(x) above.
        return self.scale * F.linear(F.gelu(self.down(x)), self.up.weight) + self.up.bias

    def add_to(self, a: torch.Tensor, x: torch.Tensor, over_tokens: bool) -> torch.Tensor:
        """a + g(x) for [B, T, D] inputs, g along channels or (`over_tokens`) along tokens; equal to
        `a + self(x)` (or its transposed form) but with s and b_up folded into one [n, r+1] matrix and the residual
        add done by the up-projection's GEMM. Training from a cache is memory-bound: this makes 3 passes over the
        activations per layer instead of 8.

        Under autocast the GEMMs run in bf16/fp16 but the residual stream `a` stays float32: a fused add would
        return it in the low precision and round z_L at every side layer (then step 0 would no longer equal the
        linear probe), so there the branch is computed alone and added in float32."""
        w_up = torch.cat([self.scale * self.up.weight, self.up.bias[:, None]], dim=1)  # [n, r+1]
        fused = not torch.is_autocast_enabled(a.device.type)
        if not over_tokens:
            h = F.pad(F.gelu(self.down(x)), (0, 1), value=1.0)  # [B, T, r+1]
            if fused:
                return torch.addmm(a.flatten(0, 1), h.flatten(0, 1), w_up.t()).view_as(a)
            return a + (h @ w_up.t())
        # Along tokens as W x (W [r, T] times x [T, D] per image), never transposing x: a transposed [B, D, T] input
        # would be copied to contiguous memory in the forward and again in the backward.
        w_down = self.down.weight.expand(x.shape[0], -1, -1)  # bmm, not matmul: matmul would transpose x to fold it
        h = F.gelu(torch.baddbmm(self.down.bias[:, None], w_down, x))  # [B, r, D]
        h = F.pad(h, (0, 0, 0, 1), value=1.0)  # [B, r+1, D]
        if fused:
            return torch.baddbmm(a, w_up.expand(a.shape[0], -1, -1), h)  # [B, T, D]
        return a + torch.bmm(w_up.expand(a.shape[0], -1, -1), h)
