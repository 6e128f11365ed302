"""What every classification method shares: the backbone's frozen final norm, token pooling, fc_norm, and the
FeatureInfo that describes cached activations to a method's `build`.

The norms are buffers, not parameters: they are saved with the model (so inference needs no extra file)
but never trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.spec import SpecError
from storage.cache.meta import EntryDescription


@dataclass(frozen=True)
class FeatureInfo:
    num_layers: int
    tokens: int
    dim: int
    num_prefix_tokens: int
    global_pool: str
    norm_eps: float
    num_classes: int
    readout: dict[str, np.ndarray]
    token_mode: str = "all"  # the tokens the module receives: all of them, or pooled (`cls`, `mean`: tokens == 1)
    temporal: int | None = None  # video: T', the temporal positions of the token grid (T = prefix + T' x S)

    @classmethod
    def from_meta(
        cls, meta: EntryDescription, readout: dict[str, np.ndarray], num_classes: int, token_mode: str = "all"
    ) -> FeatureInfo:
        """The features a cache entry's (or a backbone's, `Backbone.info`) description names, read as `token_mode`."""
        return cls(
            num_layers=meta["num_layers"],
            dim=meta["dim"],
            num_prefix_tokens=meta["num_prefix_tokens"],
            global_pool=meta["global_pool"],
            norm_eps=meta["norm_eps"],
            tokens=meta["tokens"] if token_mode == "all" else 1,
            num_classes=num_classes,
            readout=readout,
            token_mode=token_mode,
            temporal=meta.get("temporal"),
        )


class Readout(nn.Module):
    """[B, T, D] block output -> [B, D] features, exactly as the backbone's own head would compute them."""

    NAMES = ("norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias")

    def __init__(self, info: FeatureInfo, pool: str = "auto") -> None:
        super().__init__()
        if pool == "auto":
            pool = "cls" if info.global_pool == "token" else "mean"
        if pool == "cls" and info.num_prefix_tokens == 0:
            raise SpecError("pool='cls' needs a class token; this backbone has none (use 'mean')")
        if info.token_mode != "all" and pool != info.token_mode:
            raise SpecError(f"pool {pool!r} cannot read features cached as the {info.token_mode} token")
        self.pool = pool
        self.pre_pooled = info.token_mode != "all"  # one token per layer, pooled at extraction
        self.num_prefix_tokens = info.num_prefix_tokens
        self.eps = info.norm_eps
        for name in self.NAMES:
            value = info.readout.get(name)
            tensor = torch.from_numpy(np.array(value, dtype=np.float32)) if value is not None else torch.empty(0)
            self.register_buffer(name.replace(".", "_"), tensor)

    @classmethod
    def tensors_from_state(cls, state: dict[str, np.ndarray], prefix: str = "readout.") -> dict[str, np.ndarray]:
        """The backbone norms saved inside a trained model's state dict, as FeatureInfo.readout wants them."""
        found = {name: state.get(prefix + name.replace(".", "_")) for name in cls.NAMES}
        return {name: v for name, v in found.items() if v is not None and v.size}

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if weight.numel() == 0:
            return x
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pooled at extraction: the one token left (the final norm then normalises the mean token for `mean`); the
        # class token alone is normalised as it would be among the others (a layer norm is per token)
        if self.pool == "cls" or self.pre_pooled:
            x = self._norm(x[:, 0], self.norm_weight, self.norm_bias)
        else:
            x = self._norm(x, self.norm_weight, self.norm_bias)[:, self.num_prefix_tokens :].mean(dim=1)
        return self._norm(x, self.fc_norm_weight, self.fc_norm_bias)


class Classifier(nn.Module):
    """Base of cache-trained methods: `input_layers` are the cached layers `forward` receives, in order, as
    [B, len(input_layers), T, D]; `head` is the classifier (excluded from parameter counts)."""

    input_layers: list[int]
    head: nn.Linear
    # whether each configuration of a sweep computes its own [B, T, D] activations (LoSA's residual streams), so K
    # stacked configurations hold K times one network's (services/training/sweeps/stacked.py trains those in
    # micro-batches)
    own_activations: bool = False

    def side_parameters(self) -> int:
        """Trainable parameters outside the classifier (the papers' convention)."""
        head = {id(p) for p in self.head.parameters()}
        return sum(p.numel() for p in self.parameters() if p.requires_grad and id(p) not in head)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The whole state: side network, classifier and the (small) frozen norm buffers."""
        return self.state_dict()

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)
