"""Where a training step's inputs come from, one class per execution mode's input:

- `CacheSource`: cached activations of some layers (modes `cache` and `tail`), held in memory when they fit
  the budget, else read from the cache per batch;
- `ImageSource`: decoded, transformed images (mode `images`), augmented or not;
- `OnlineSource`: images through the frozen backbone under no_grad on every batch (mode `online`, the LoSA
  paper's way of training, and the baseline the cache is measured against);
- `PooledSource`: another source's activations pooled to one token per layer, as a pooled cache holds them.

Every source answers `batch(positions) -> (raw, kept)`, which may run in a loader thread, and `ready(raw)`, which
runs in the training thread and gives the model's input: `kept` are the positions actually in the batch (an
undecodable image is dropped when the job says `on_corrupt="skip"`). Torch work stays in the training thread (see
`SplitTransform`): images are decoded and cropped in the loader, made tensors and run through the backbone in
`ready`. `prefetch` loads the next batch in a thread while the current one trains.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch

from services.backbones import Backbone, SplitTransform
from services.datasets import Dataset, DatasetError, load_image
from storage.cache import CacheEntry, pool_tokens


class Source(Protocol):
    def batch(self, positions: np.ndarray) -> tuple[Any, np.ndarray]: ...

    def ready(self, raw: Any) -> torch.Tensor: ...


class CacheSource:
    """Held in host memory when it fits `budget_bytes`, and then on the accelerator too when it fits
    `device_budget_bytes` (batches are then gathered on the device: no host-to-device copy per step);
    otherwise random mini-batches are read from the cache (chunks of about 1 MiB) in a prefetch thread."""

    def __init__(
        self,
        entry: CacheEntry,
        indices: np.ndarray,
        layers: list[int],
        budget_bytes: int,
        device: str = "cpu",
        device_budget_bytes: int = 0,
    ) -> None:
        self.entry, self.indices, self.layers = entry, indices, layers
        _, _, t, d = entry.meta["shape"]
        nbytes = len(indices) * len(layers) * t * d * 2
        self.in_memory = nbytes <= budget_bytes
        self.data = torch.from_numpy(entry.read(indices, layers)) if self.in_memory else None
        self.on_device = self.data is not None and device != "cpu" and nbytes <= device_budget_bytes
        if self.on_device:
            self.data = self.data.to(device)

    def batch(self, positions: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        if self.data is not None:
            return self.data[torch.from_numpy(positions).to(self.data.device)], positions
        return torch.from_numpy(self.entry.read(self.indices[positions], self.layers)), positions

    def ready(self, raw: torch.Tensor) -> torch.Tensor:
        return raw


class ImageSource:
    in_memory = False

    def __init__(self, dataset: Dataset, indices: np.ndarray, transform: Any, skip_corrupt: bool) -> None:
        self.dataset, self.indices, self.transform, self.skip_corrupt = dataset, indices, transform, skip_corrupt
        self.split = SplitTransform.of(transform)
        self.skipped: set[str] = set()

    def batch(self, positions: np.ndarray) -> tuple[Any, np.ndarray]:
        images, kept = [], []
        for pos in positions:
            path = self.dataset.paths[self.indices[pos]]
            try:
                image = load_image(path)
                images.append(self.split.load(image) if self.split else self.transform(image))
            except DatasetError:
                if not self.skip_corrupt:
                    raise
                self.skipped.add(str(path))
                continue
            kept.append(pos)
        if not images:
            return torch.empty(0), np.array([], dtype=np.int64)
        return (np.stack(images) if self.split else torch.stack(images)), np.array(kept, dtype=np.int64)

    def ready(self, raw: Any) -> torch.Tensor:
        return self.split.to_input(raw) if isinstance(raw, np.ndarray) else raw


class OnlineSource:
    in_memory = False

    def __init__(self, images: ImageSource, backbone: Backbone, layers: list[int]) -> None:
        self.images, self.backbone, self.layers = images, backbone, layers

    def batch(self, positions: np.ndarray) -> tuple[Any, np.ndarray]:
        return self.images.batch(positions)

    def ready(self, raw: Any) -> torch.Tensor:
        # the backbone here, in the training thread: in the loader thread its OpenMP team and the side network's
        # would share the cores (online LoSA on 2 cores: 206 img/s here, 156-196 there)
        return self.backbone.intermediates(self.images.ready(raw), self.layers)


class PooledSource:
    """Another source's activations pooled to one token per layer (`cls` or `mean`), as a cache of pooled tokens
    holds them: live activations for a model trained on such a cache (a separate test set)."""

    in_memory = False

    def __init__(self, source: Source, mode: str, num_prefix_tokens: int) -> None:
        self.source, self.mode, self.num_prefix_tokens = source, mode, num_prefix_tokens

    def batch(self, positions: np.ndarray) -> tuple[Any, np.ndarray]:
        return self.source.batch(positions)

    def ready(self, raw: Any) -> torch.Tensor:
        return pool_tokens(self.source.ready(raw), self.mode, self.num_prefix_tokens)


def prefetch(source: Source, batches: Sequence[np.ndarray]) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """Yield each batch of `batches` ready for the model, loading the next one in a thread meanwhile when loading
    means I/O or decoding; a gather from memory stays in this thread (a thread only adds contention there: -20%)."""
    if not batches:
        return
    if getattr(source, "in_memory", False):
        for b in batches:
            raw, kept = source.batch(b)
            yield source.ready(raw), kept
        return
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(source.batch, batches[0])
        for i in range(len(batches)):
            raw, kept = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(source.batch, batches[i + 1])
            yield (source.ready(raw) if len(kept) else raw), kept
