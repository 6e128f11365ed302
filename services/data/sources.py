"""Where a training step's inputs come from, one class per execution mode's input:

- `CacheSource`: cached activations of some layers (modes `cache` and `tail`), held on the device or in host memory
  when they fit the budgets, else read from the cache per batch;
- `ImageSource`: decoded, transformed images or clips (mode `images`), augmented or not;
- `OnlineSource`: images through the frozen backbone under no_grad on every batch (mode `online`, the LoSA
  paper's way of training, and the baseline the cache is measured against);
- `PooledSource`: another source's activations pooled to one token per layer, as a pooled cache holds them.

Every source answers `iterate(batches)`: for each batch of positions (into its indices), `(x, y)` on the device,
ready for the model. Nothing in it waits for the device: labels travel with their inputs (gathered on the device
when the features live there), so a training step never synchronises with the host. Images are decoded and resized
by loader processes (services/data/loading.py) and normalised on the device; an undecodable image is dropped from its
batch when the job says `on_corrupt="skip"` (a batch may then come out empty).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch

from services.backbones import Backbone
from services.data.datasets import Dataset
from services.data.loading import BatchReader, iterate
from services.data.transforms import SplitTransform
from storage.cache import CacheEntry, pool_tokens

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels), both on the device


class Source(Protocol):
    def iterate(self, batches: Sequence[np.ndarray]) -> Iterator[Batch]: ...


class CacheSource:
    """Held in host memory when it fits `budget_bytes`, and then on the device too when it fits
    `device_budget_bytes` (batches are then gathered there: no host-to-device copy per step); otherwise random
    mini-batches are read from the cache (chunks of about 1 MiB) in a prefetch thread."""

    def __init__(
        self,
        entry: CacheEntry,
        indices: np.ndarray,
        labels: np.ndarray,
        layers: list[int],
        budget_bytes: int,
        device: str = "cpu",
        device_budget_bytes: int = 0,
    ) -> None:
        self.entry, self.indices, self.layers, self.device = entry, indices, layers, torch.device(device)
        _, _, t, d = entry.meta["shape"]
        nbytes = len(indices) * len(layers) * t * d * 2
        self.in_memory = nbytes <= budget_bytes
        self.data = torch.from_numpy(entry.read(indices, layers)) if self.in_memory else None
        self.on_device = self.data is not None and self.device.type != "cpu" and nbytes <= device_budget_bytes
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        if self.on_device:
            self.data, self.labels = self.data.to(self.device), self.labels.to(self.device)

    def iterate(self, batches: Sequence[np.ndarray]) -> Iterator[Batch]:
        if not batches:
            return
        if self.on_device:  # the epoch's order moves once; every batch is a slice of it
            order = torch.from_numpy(np.concatenate(batches)).to(self.device, non_blocking=True)
            start = 0
            for b in batches:
                idx = order[start : start + len(b)]
                start += len(b)
                yield self.data[idx], self.labels[idx]
        elif self.data is not None:  # a gather in this thread: a loader thread only adds contention (-20%)
            for b in batches:
                idx = torch.from_numpy(b)
                yield self.data[idx].to(self.device, non_blocking=True), self.labels[idx].to(self.device)
        else:
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(self.entry.read, self.indices[batches[0]], self.layers)
                for i, b in enumerate(batches):
                    raw = pending.result()
                    if i + 1 < len(batches):
                        pending = pool.submit(self.entry.read, self.indices[batches[i + 1]], self.layers)
                    yield torch.from_numpy(raw).to(self.device), self.labels[torch.from_numpy(b)].to(self.device)


class ImageSource:
    """`split` is the transform's loader side (PIL steps) and device side (normalisation), `dtype` the input's.
    `reader` makes the loaders' reader of an epoch's batches (default: images through `split`'s PIL steps; clips:
    services/video/loading.py)."""

    def __init__(
        self,
        dataset: Dataset,
        indices: np.ndarray,
        split: SplitTransform,
        skip_corrupt: bool,
        device: str = "cpu",
        workers: int = 0,
        dtype: torch.dtype = torch.float32,
        reader: Callable[[list[np.ndarray]], BatchReader] | None = None,
    ) -> None:
        self.dataset, self.indices, self.split, self.skip_corrupt = dataset, indices, split, skip_corrupt
        self.device, self.workers, self.dtype = torch.device(device), workers, dtype
        self.labels = dataset.labels
        self.reader = reader or (lambda rows: BatchReader(dataset.paths, rows, split.pil, skip_corrupt))
        # what the loaders said, for the job's events: corrupt files skipped, short videos padded (each once)
        self.errors: set[str] = set()
        self.notes: set[str] = set()

    def iterate(self, batches: Sequence[np.ndarray]) -> Iterator[Batch]:
        reader = self.reader([self.indices[b] for b in batches])
        pin = self.device.type == "cuda"
        with contextlib.closing(iterate(reader, self.workers, pin)) as loaded:
            for batch in loaded:
                self.errors.update(batch.errors)
                self.notes.update(batch.notes)
                rows = batch.positions[batch.valid]
                y = torch.from_numpy(self.labels[rows]).to(self.device)
                if batch.images is None:
                    yield torch.empty(0, device=self.device), y
                    continue
                images = batch.images if batch.valid.all() else batch.images[torch.from_numpy(batch.valid)]
                yield self.split.to_input(images, self.device, self.dtype), y


class OnlineSource:
    def __init__(self, images: ImageSource, backbone: Backbone, layers: list[int]) -> None:
        self.images, self.backbone, self.layers = images, backbone, layers
        self.errors, self.notes = images.errors, images.notes

    def iterate(self, batches: Sequence[np.ndarray]) -> Iterator[Batch]:
        for x, y in self.images.iterate(batches):
            # the backbone here, in the training thread: in a loader thread its OpenMP team and the side network's
            # would share the cores (online LoSA on 2 cores: 206 img/s here, 156-196 there)
            yield (self.backbone.intermediates(x, self.layers) if len(y) else x), y


class PooledSource:
    """Another source's activations pooled to one token per layer (`cls` or `mean`), as a cache of pooled tokens
    holds them: live activations for a model trained on such a cache (a separate test set)."""

    def __init__(self, source: Source, mode: str, num_prefix_tokens: int) -> None:
        self.source, self.mode, self.num_prefix_tokens = source, mode, num_prefix_tokens

    def iterate(self, batches: Sequence[np.ndarray]) -> Iterator[Batch]:
        for x, y in self.source.iterate(batches):
            yield (pool_tokens(x, self.mode, self.num_prefix_tokens) if len(y) else x), y
