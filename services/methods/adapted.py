"""What every backbone-adapting method shares (APLA, ARC, LoRA, full fine-tuning): a timm ViT whose blocks the
method modifies, plus a new classifier.

Such a model trains in one of two ways:
- `images`: forward and backward through the whole backbone on images (`tail_blocks=None`);
- `tail`: only the last k blocks are adapted, and training starts from the cached output of block L-k-1
  (the input of block L-k), so the frozen prefix never runs. `input_layers` then names that cached layer.
After training, `merge()` folds the method into plain timm modules, so inference costs exactly the backbone.

A method subclasses `AdaptedViT`, modifies `self.vit.blocks[i]` for i in `self.adapted_blocks` in its
`__init__`, marks its trainable parameters with `requires_grad`, and overrides `merge()` when it can fold.
Frozen weights must stay parameters with `requires_grad=False` (not persistent buffers), so they are not saved.
Frozen backbone weights are never saved with the model: `trainable_state()` holds only what the method
trained plus its buffers (e.g. APLA's row indices); inference rebuilds the backbone from its own weights.
"""

from __future__ import annotations

import torch
from torch import nn

from services.spec import SpecError


class AdaptedViT(nn.Module):
    input_layers: list[int] | None

    def __init__(self, vit: nn.Module, num_classes: int, tail_blocks: int | None = None) -> None:
        super().__init__()
        num_layers = len(vit.blocks)
        if tail_blocks is not None and not 1 <= tail_blocks < num_layers:
            raise SpecError(
                f"execution.tail_blocks must be between 1 and {num_layers - 1} for this {num_layers}-block backbone"
            )
        vit.requires_grad_(False)
        vit.reset_classifier(num_classes)
        self.vit = vit
        self.head.requires_grad_(True)
        self.tail_blocks = tail_blocks
        self.first_block = 0 if tail_blocks is None else num_layers - tail_blocks
        # tail mode reads the output of the block before the first adapted one from the cache
        self.input_layers = None if tail_blocks is None else [self.first_block - 1]

    @property
    def head(self) -> nn.Module:
        """The new classifier (a property, not a second registration, so its weights are saved once)."""
        return self.vit.head

    @property
    def adapted_blocks(self) -> range:
        """Indices of the blocks a method may modify: all of them, or the last k in tail mode."""
        return range(self.first_block, len(self.vit.blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> logits; in tail mode, cached activations [B, 1, T, D] -> logits."""
        if self.input_layers is None:
            return self.vit(x)
        x = x[:, 0].to(self.head.weight.dtype)
        for block in self.vit.blocks[self.first_block :]:
            x = block(x)
        return self.vit.forward_head(self.vit.norm(x))

    def side_parameters(self) -> int:
        """Trainable parameters outside the classifier (the papers' convention)."""
        head = {id(p) for p in self.head.parameters()}
        return sum(p.numel() for p in self.parameters() if p.requires_grad and id(p) not in head)

    def frozen_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if not p.requires_grad}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen backbone weights: what the method trained, its buffers, the classifier."""
        frozen = self.frozen_names()
        return {k: v for k, v in self.state_dict().items() if k not in frozen}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        frozen = self.frozen_names()
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shapes differ: saved with another rank or backbone
            raise ValueError(f"saved weights do not fit this model: {e}") from None
        lost = [k for k in missing if k not in frozen]
        if lost or unexpected:
            raise ValueError(f"saved weights do not fit this model: missing {lost[:5]}, unexpected {unexpected[:5]}")

    def merge(self) -> nn.Module:
        """A plain timm ViT with the method folded in (images -> logits), made in place: save the trainable state
        first. Default: the ViT as it is."""
        return self.vit
