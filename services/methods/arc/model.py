"""ARC (Dong et al., NeurIPS 2023) on a timm ViT: shared symmetric adapters after LN1 and LN2 of each block.

Each adapted block's `norm1` and `norm2` become the norm followed by an adapter
h' = h + Dropout(h (U * s)) U^T + b, with U [D, r] shared by all adapted blocks (`u_attn` before the
attention, `u_mlp` before the MLP, xavier-uniform as in the official code) and s [r], b [D] per block.
s and b start at zero, so at step 0 (in train mode too) the model is exactly the pretrained one. The official
code starts the MLP scales s_mlp xavier-uniform instead, so its step 0 already perturbs the backbone; we follow
the equations and keep both zero.

`merge()` folds M = I + U diag(s) U^T (symmetric) and b into the linear layers that read the norm's output:
qkv(h M + b) = h (W M)^T + (W b + c), so W <- W M and c <- c + W b, in float64 for accuracy.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from services.methods.adapted import AdaptedViT
from services.methods.arc.config import ArcConfig
from services.spec import SpecError


class SharedBasis(nn.Module):
    """The projections every adapted block shares: `u_attn` and `u_mlp`, each [D, r]."""

    def __init__(self, dim: int, rank: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.u_attn = nn.Parameter(torch.empty(dim, rank, device=device, dtype=dtype))
        self.u_mlp = nn.Parameter(torch.empty(dim, rank, device=device, dtype=dtype))
        nn.init.xavier_uniform_(self.u_attn)
        nn.init.xavier_uniform_(self.u_mlp)


class ArcAdapter(nn.Module):
    """h -> h + Dropout(h (U * s)) U^T + b: U from the shared basis, s [r] and b [D] this block's own."""

    def __init__(self, basis: SharedBasis, which: str, dropout: float) -> None:
        super().__init__()
        dim, rank = basis.u_attn.shape
        kw = {"device": basis.u_attn.device, "dtype": basis.u_attn.dtype}
        # A plain attribute, not a submodule: the basis belongs to the Arc model once, so U is counted, saved
        # and given to the optimizer once however many blocks use it. U is looked up at every call (not held as
        # a tensor), so it follows the basis through .to() and load_state_dict.
        self.__dict__["_basis"] = basis
        self.which = which
        self.scale = nn.Parameter(torch.zeros(rank, **kw))
        self.bias = nn.Parameter(torch.zeros(dim, **kw))
        self.dropout = nn.Dropout(dropout)

    @property
    def u(self) -> nn.Parameter:
        return getattr(self._basis, self.which)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = self.u
        # down (scaled columns of U), dropout on the r-dimensional code, up with U^T: never a D x D matrix.
        return h + self.dropout(h @ (u * self.scale)) @ u.T + self.bias

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, b) in float64, with the adapter (dropout off) being h -> h M + b and M = I + U diag(s) U^T."""
        u, s, b = self.u.double(), self.scale.double(), self.bias.double()
        return torch.eye(u.shape[0], dtype=u.dtype, device=u.device) + (u * s) @ u.T, b

    def extra_repr(self) -> str:
        return f"shares={self.which}, rank={self.scale.numel()}"


class AdaptedNorm(nn.Module):
    """A block's norm followed by its adapter: what the attention (norm1) or the MLP (norm2) then reads."""

    def __init__(self, norm: nn.Module, adapter: ArcAdapter) -> None:
        super().__init__()
        self.norm = norm
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.norm(x))


def _readers(block: nn.Module) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """The linear layers that read norm1's and norm2's output, into which merge() folds the adapters."""
    attn = [block.attn.qkv] + ([block.attn.gate] if isinstance(getattr(block.attn, "gate", None), nn.Linear) else [])
    mlp = [block.mlp.fc1] if hasattr(block.mlp, "fc1") else [block.mlp.fc1_g, block.mlp.fc1_x]  # Mlp/GluMlp, SwiGLU
    return attn, mlp


def _check_block(index: int, block: nn.Module) -> None:
    # ARC sits between a pre-norm and the first linear layer after it; other block layouts (post-norm, parallel,
    # separate q/k/v biases) would need their own placement and merge.
    try:
        attn, mlp = _readers(block)
        ok = isinstance(block, Block) and not hasattr(block.attn, "q_bias")
        ok = ok and all(isinstance(layer, nn.Linear) for layer in [*attn, *mlp])
    except AttributeError:
        ok = False
    if not ok:
        raise SpecError(
            f"ARC needs timm pre-norm ViT blocks (norm1 -> attn.qkv, norm2 -> mlp.fc1); block {index} is a "
            f"{type(block).__name__}"
        )


class Arc(AdaptedViT):
    def __init__(self, config: ArcConfig, vit: nn.Module, num_classes: int, tail_blocks: int | None = None) -> None:
        dim = vit.embed_dim
        if config.rank > dim:
            raise SpecError(f"method.rank ({config.rank}) must not exceed the backbone's embedding dimension ({dim})")
        for i, block in enumerate(vit.blocks):
            _check_block(i, block)
        super().__init__(vit, num_classes, tail_blocks)
        # the official code starts the head at zero (`zero_head=True`): the first steps train the adapters from a
        # neutral classifier instead of a random one
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # New parameters live where the backbone does (the meta device when only counting parameters).
        ref = vit.blocks[0].attn.qkv.weight
        self.basis = SharedBasis(dim, config.rank, ref.device, ref.dtype)
        for i in self.adapted_blocks:
            block = self.vit.blocks[i]
            block.norm1 = AdaptedNorm(block.norm1, ArcAdapter(self.basis, "u_attn", config.dropout))
            block.norm2 = AdaptedNorm(block.norm2, ArcAdapter(self.basis, "u_mlp", config.dropout))

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold every adapter into the linear layers after it and restore the plain norms, in place: the
        returned ViT (also this model's, from now on) equals the adapted model in eval mode at no extra cost."""
        for block in self.vit.blocks:
            for attr, readers in zip(("norm1", "norm2"), _readers(block), strict=True):
                wrapped = getattr(block, attr)
                if not isinstance(wrapped, AdaptedNorm):
                    continue  # a block tail mode leaves alone, or merged already
                m, b = wrapped.adapter.affine()
                for linear in readers:
                    w = linear.weight.double()
                    bias = w @ b if linear.bias is None else linear.bias.double() + w @ b
                    linear.weight.copy_(w @ m)  # W M; M is symmetric, so no transpose is needed
                    if linear.bias is None:  # e.g. qkv_bias=False: b needs a bias to fold into
                        linear.bias = nn.Parameter(bias.to(linear.weight.dtype), requires_grad=False)
                    else:
                        linear.bias.copy_(bias)
                setattr(block, attr, wrapped.norm)
        return self.vit


def build(config: ArcConfig, vit: nn.Module, num_classes: int, tail_blocks: int | None = None) -> Arc:
    return Arc(config, vit, num_classes, tail_blocks)
