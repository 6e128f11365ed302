"""A backbone's eval transform split where torch starts (`SplitTransform`): the PIL steps run in the loaders, the
normalisation on the device, for images and for every frame of a clip alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.transforms import Compose


@dataclass(frozen=True)
class SplitTransform:
    """A torchvision transform laid out as timm's `[PIL steps..., ToTensor, Normalize]`, split where torch starts.

    Loader threads run `load` (decode-side PIL steps: resize, crop, flips, jitter; no torch) and the thread that runs
    the model makes the batch a tensor with `to_input`. Why: torch ops in a second thread start a second OpenMP
    team, and with more OpenMP threads than cores every forward slows down (vit_tiny on 2 cores: 265 img/s with a
    torch-free loader thread, 220 with the whole transform in it).
    """

    pil: Any
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, transform: Any) -> SplitTransform | None:
        """The split, or None for a transform of another layout (then run it whole)."""
        steps = list(getattr(transform, "transforms", []))
        if [type(t).__name__ for t in steps[-2:]] not in (["ToTensor", "Normalize"], ["MaybeToTensor", "Normalize"]):
            return None
        norm = steps[-1]
        mean = torch.as_tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.as_tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1)
        return cls(Compose(steps[:-2]), mean, std)

    def load(self, image: Any) -> np.ndarray:
        """An RGB PIL image -> uint8 [H, W, 3] after the PIL steps."""
        return np.asarray(self.pil(image), dtype=np.uint8)

    def to_input(
        self, images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> the normalised batch [B, 3, H, W] on `device` in `dtype`: normalised there (a quarter
        of the bytes travel), in float32 as ToTensor and Normalize compute it (bit-equal on the CPU), then cast."""
        images = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
        if images.dim() == 5:  # clips [B, T, H, W, 3] -> [B, T*3, H, W], frames stacked along channels
            b, t, h, w, _ = images.shape
            x = images.to(device, non_blocking=True).permute(0, 1, 4, 2, 3)
            x = x.to(torch.float32, memory_format=torch.contiguous_format).div_(255).view(b * t, 3, h, w)
            x = x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device)).view(b, t * 3, h, w)
            return x if dtype == torch.float32 else x.to(dtype)
        x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        x = x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))
        return x if dtype == torch.float32 else x.to(dtype)
