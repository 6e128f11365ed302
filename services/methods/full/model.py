"""Full fine-tuning: the whole ViT and its new classifier are trained; `merge()` is the ViT itself."""

from __future__ import annotations

from torch import nn

from services.methods.adapted import AdaptedViT
from services.methods.full.config import FullConfig
from services.spec import SpecError


class FullFineTune(AdaptedViT):
    def __init__(self, vit: nn.Module, num_classes: int, tail_blocks: int | None = None) -> None:
        if tail_blocks is not None:
            raise SpecError("full fine-tuning trains on images only (mode `images`), not in `tail` mode")
        super().__init__(vit, num_classes, tail_blocks)
        self.vit.requires_grad_(True)


def build(config: FullConfig, vit: nn.Module, num_classes: int, tail_blocks: int | None = None) -> FullFineTune:
    return FullFineTune(vit, num_classes, tail_blocks)
