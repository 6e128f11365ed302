"""APLA (Sorkhei et al., "APLA: A Simple Adaptation Method for Vision Transformers", arXiv:2503.11335):
in every adapted block, r seeded random output rows of `attn.proj` (and their biases) are trainable.

Each `attn.proj` becomes a `PartialLinear`: the pretrained weight and bias stay as frozen parameters, `rows`
(a persistent buffer, saved with the artifact) names the r trainable output rows, and `weight_rows` /
`bias_rows` hold their trainable copies. The forward pass puts the trainable rows back into the frozen weight,
so step 0 equals the pretrained model bit for bit, and `Apla.merge()` folds the rows into a plain nn.Linear.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.methods.adapted import AdaptedViT
from services.methods.apla.config import AplaConfig
from services.spec import SpecError


def choose_rows(num_rows: int, rank: int, subset_seed: int, block: int) -> torch.Tensor:
    """r distinct rows of `num_rows`, drawn from (subset_seed, block) on the CPU, ascending (int64).

    Like the official code, the first r entries of a random permutation; but seeded per block, so the choice is
    reproducible and a block gets the same rows whichever blocks are adapted (images or tail mode). SeedSequence
    mixes the two numbers into one well-spread 64-bit seed (no collisions between nearby (seed, block) pairs).
    """
    seed = int(np.random.SeedSequence([subset_seed, block]).generate_state(1, dtype=np.uint64)[0])
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(num_rows, generator=generator)[:rank].sort().values


class PartialLinear(nn.Module):
    """A Linear whose output rows `rows` are trainable and whose other rows are frozen."""

    def __init__(self, linear: nn.Linear, rows: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Frozen parameters, not buffers: AdaptedViT leaves them out of the saved state (inference rebuilds the
        # backbone from its own weights), and the names match the original Linear's.
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        # .to works on the meta device too (its values are then lost, which parameter counting does not need).
        self.register_buffer("rows", rows.to(device=self.weight.device, dtype=torch.int64))
        self.weight_rows = nn.Parameter(self.weight.detach()[self.rows].clone())
        self.bias_rows = None if self.bias is None else nn.Parameter(self.bias.detach()[self.rows].clone())

    def merged_weight(self) -> torch.Tensor:
        # index_copy returns a new tensor: the frozen weight is untouched, and the gradient reaches weight_rows only.
        return self.weight.index_copy(0, self.rows, self.weight_rows.to(self.weight.dtype))

    def merged_bias(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return self.bias.index_copy(0, self.rows, self.bias_rows.to(self.bias.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same F.linear as nn.Linear on a weight equal to the pretrained one at step 0: exact, not approximate.
        return F.linear(x, self.merged_weight(), self.merged_bias())

    def to_linear(self) -> nn.Linear:
        """A plain frozen nn.Linear with the trained rows folded in."""
        weight = self.merged_weight().detach()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.merged_bias().detach())
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, trainable_rows={len(self.rows)}"


class Apla(AdaptedViT):
    def __init__(self, config: AplaConfig, vit: nn.Module, num_classes: int, tail_blocks: int | None = None) -> None:
        # Check before AdaptedViT touches the backbone, so a bad config leaves `vit` as it was.
        for i, block in enumerate(vit.blocks):
            proj = getattr(getattr(block, "attn", None), "proj", None)
            if not isinstance(proj, nn.Linear):
                raise SpecError(f"APLA needs blocks[i].attn.proj to be an nn.Linear; block {i} has {type(proj)}")
            if config.rank > proj.out_features:
                raise SpecError(
                    f"method.rank {config.rank} is larger than the attention projection's {proj.out_features} "
                    f"output rows (block {i}); choose method.rank <= {proj.out_features}"
                )
        super().__init__(vit, num_classes, tail_blocks)
        self.rank, self.subset_seed = config.rank, config.subset_seed
        for i in self.adapted_blocks:
            attn = self.vit.blocks[i].attn
            # the absolute block index seeds the rows: tail mode picks the rows images mode would pick
            attn.proj = PartialLinear(
                attn.proj, choose_rows(attn.proj.out_features, config.rank, config.subset_seed, i)
            )

    def merge(self) -> nn.Module:
        """The plain timm ViT with every PartialLinear folded into an nn.Linear.

        In place: `self.vit` is merged too (it computes the same function), so the trainable state is gone after
        this; merge the model you serve, not one you still train or save.
        """
        for i in self.adapted_blocks:
            attn = self.vit.blocks[i].attn
            if isinstance(attn.proj, PartialLinear):
                attn.proj = attn.proj.to_linear()
        return self.vit


def build(config: AplaConfig, vit: nn.Module, num_classes: int, tail_blocks: int | None = None) -> Apla:
    return Apla(config, vit, num_classes, tail_blocks)
