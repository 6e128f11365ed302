"""Image loading for extraction and training: batches decoded and resized in loader processes, handed over as
uint8 tensors (pinned on a GPU), normalised on the device.

A loader process (a `torch.utils.data.DataLoader` worker, started through a forkserver) decodes one whole batch at
a time with Pillow and runs the transform's PIL steps (resize, crop, flips, jitter), so decoding scales with the
machine's cores while the process that runs the model keeps its own. Each worker runs one torch thread and dies
with its parent (PR_SET_PDEATHSIG on Linux), so a SIGKILLed extract or train worker leaves no loader behind; a
cancelled or failed run shuts its workers down when its iterator is dropped. With `workers == 0` one thread of
this process decodes one batch ahead instead (what a 2-core machine gets by default: no core is left over).

Batches are uint8 [B, H, W, 3]: a quarter of the bytes of float32 to move between processes and to the device.
`to_input` makes the model's float input from them on the device, as ToTensor + Normalize would on the CPU.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from services.datasets import DatasetError, load_image
from storage.settings import Settings


def loader_workers(settings: Settings, images: int) -> int:
    """Loader processes for `images` images: `settings.loader_workers`, where `auto` is the cores left after the
    thread that runs the model and the cache writer, and none for fewer than 256 images (starting processes would
    cost more than decoding them). 0 means a loader thread in this process."""
    if settings.loader_workers != "auto":
        return int(settings.loader_workers)
    if images < 256:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, cores - 2)


@dataclass
class ImageBatch:
    """One decoded batch: `images` uint8 [B, H, W, 3] (None when no image of it could be decoded), `valid` which
    rows hold an image (a corrupt one is a zero row when the job skips corrupt images), `errors` their messages."""

    images: torch.Tensor | None
    valid: np.ndarray
    errors: list[str] = field(default_factory=list)
    positions: np.ndarray | None = None  # the dataset positions of the rows, as asked

    def pin_memory(self) -> ImageBatch:
        """Called by the DataLoader's pin-memory thread (a documented hook of custom batch types)."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


class BatchReader(torch.utils.data.Dataset):
    """Item k is batch k of `batches` (arrays of indices into `paths`), decoded and put through `pil` (a callable on
    an RGB PIL image returning an array [H, W, 3]). Picklable: it travels to the loader processes."""

    def __init__(self, paths: Sequence[Path], batches: Sequence[np.ndarray], pil: Any, skip_corrupt: bool) -> None:
        self.paths, self.batches, self.pil, self.skip_corrupt = paths, batches, pil, skip_corrupt

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> ImageBatch:
        positions = np.asarray(self.batches[k])
        images: list[np.ndarray | None] = []
        errors: list[str] = []
        for i in positions:
            try:
                images.append(np.asarray(self.pil(load_image(self.paths[i])), dtype=np.uint8))
            except DatasetError as e:
                if not self.skip_corrupt:
                    # returned, not raised: the DataLoader would wrap it in a traceback of the worker
                    return ImageBatch(None, np.zeros(len(positions), bool), [str(e)], positions)
                images.append(None)
                errors.append(str(e))
        valid = np.array([im is not None for im in images])
        ok = next((im for im in images if im is not None), None)
        if ok is None:
            return ImageBatch(None, valid, errors, positions)
        stacked = np.stack([im if im is not None else np.zeros_like(ok) for im in images])
        return ImageBatch(torch.from_numpy(stacked), valid, errors, positions)


def _die_with_parent(_: int) -> None:
    """DataLoader worker init: one torch thread (the DataLoader sets it too) and, on Linux, a SIGKILL when the
    process that forked this worker dies, however it dies."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _context() -> multiprocessing.context.BaseContext:
    """A forkserver: forking this process would copy its threads' state (zarr's event loop, CUDA, locks held by
    other threads); the server is forked once, clean, with torch and Pillow imported, and forks each worker."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchvision.transforms", "timm.data", "PIL.Image", "services.loading"])
    return ctx


def iterate(reader: BatchReader, workers: int, pin_memory: bool = False) -> Iterator[ImageBatch]:
    """The reader's batches in order, loaded by `workers` processes (0: one thread, one batch ahead). A corrupt image
    under `skip_corrupt=False` raises DatasetError naming it, here, with no worker traceback around it."""
    for batch in _raw(reader, workers, pin_memory):
        if batch.images is None and not batch.valid.any() and batch.errors and not reader.skip_corrupt:
            raise DatasetError(batch.errors[0])
        yield batch


def _raw(reader: BatchReader, workers: int, pin_memory: bool) -> Iterator[ImageBatch]:
    if len(reader) == 0:
        return
    if workers <= 0:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(reader.__getitem__, 0)
            for k in range(len(reader)):
                batch = pending.result()
                if k + 1 < len(reader):
                    pending = pool.submit(reader.__getitem__, k + 1)
                yield batch.pin_memory() if pin_memory else batch
        return
    loader = DataLoader(
        reader, batch_size=None, shuffle=False, num_workers=min(workers, len(reader)), pin_memory=pin_memory,
        worker_init_fn=_die_with_parent, multiprocessing_context=_context(), prefetch_factor=2,
    )  # fmt: skip
    batches = iter(loader)
    try:
        yield from batches
    finally:
        del batches  # the DataLoader's iterator shuts its workers down when it is collected


def to_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """uint8 [B, H, W, 3] -> the normalised batch [B, 3, H, W] on `device` in `dtype`, computed in float32 as
    ToTensor + Normalize compute it (bit-equal on the CPU), then cast."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    x = x.sub_(mean.to(device)).div_(std.to(device))
    return x if dtype == torch.float32 else x.to(dtype)
