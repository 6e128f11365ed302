"""Image loading for extraction and training: batches decoded and resized in loader processes, handed over as
uint8 tensors (pinned on a GPU), normalised on the device.

A loader process (a `torch.utils.data.DataLoader` worker, started through a forkserver) decodes one whole batch at
a time with Pillow and runs the transform's PIL steps (resize, crop, flips, jitter), so decoding scales with the
machine's cores while the process that runs the model keeps its own. Each worker runs one torch thread and ends as
soon as the process that iterates it ends (a pidfd), so a SIGKILLed extract or train worker leaves no loader behind;
a cancelled or failed run shuts its workers down when its iterator is closed. With `workers == 0` one thread of
this process decodes one batch ahead instead (what a 2-core machine gets by default: no core is left over).

Batches are uint8 [B, H, W, 3] (clips: [B, T, H, W, 3], services/video/loading.py): a quarter of the bytes of
float32 to move between processes and to the device.
`to_input` makes the model's float input from them on the device, as ToTensor + Normalize would on the CPU.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from services.data.datasets import DatasetError, load_image
from services.data.formats.samples import InFile, Item, read_together
from services.data.images import MAX_IMAGE_PIXELS, ImageError, draft_size, header, orient
from storage.faults import StoreUnavailable
from storage.settings import Settings


def loader_workers(settings: Settings, images: int, device: torch.device | str = "cuda") -> int:
    """Loader processes for `images` images: `settings.loader_workers`, where `auto` is the cores left after the
    thread that runs the model and the cache writer, and none for fewer than 256 images (starting processes would
    cost more than decoding them). 0 means a loader thread in this process. When the model runs on the CPU too, it
    is the slower side by far (a ViT forward costs 3-30x a decode per core), so `auto` gives the loaders a quarter
    of the cores and the forward the rest (`cpu_threads_beside`)."""
    if settings.loader_workers != "auto":
        return int(settings.loader_workers)
    if images < 256:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores // 4 if torch.device(device).type == "cpu" else max(0, cores - 2)


@contextmanager
def cpu_threads_beside(loaders: int, device: torch.device) -> Iterator[None]:
    """While a model on the CPU runs beside `loaders` loader processes, it runs on the cores they leave: an intra-op
    thread that a decoder preempts holds up every other one at the next barrier. (Without loader processes, the
    batches are decoded between forwards instead: `iterate`'s `threads`.)"""
    if device.type != "cpu" or loaders <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before - loaders))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class ImageBatch:
    """One decoded batch: `images` uint8 [B, H, W, 3] (None when no image of it could be decoded), `valid` which
    rows hold an image (a corrupt one is a zero row when the job skips corrupt images), `errors` their messages."""

    images: torch.Tensor | list[torch.Tensor] | None
    valid: np.ndarray
    errors: list[str] = field(default_factory=list)
    positions: np.ndarray | None = None  # the dataset positions of the rows, as asked
    notes: list[str] = field(default_factory=list)  # what the job's events should say (e.g. a short video padded)
    orientations: list[int] = field(default_factory=list)  # EncodedReader: the EXIF orientation of each of `images`
    unavailable: str | None = None  # the store holding the items did not answer (after retries): the message

    def pin_memory(self) -> ImageBatch:
        """Called by the DataLoader's pin-memory thread (a documented hook of custom batch types)."""
        if isinstance(self.images, list):  # encoded files (EncodedReader)
            self.images = [im.pin_memory() for im in self.images]
        elif self.images is not None:
            self.images = self.images.pin_memory()
        return self


class BatchReader(torch.utils.data.Dataset):
    """Item k is batch k of `batches` (arrays of indices into `paths`: files, or members of shards), decoded and put
    through `pil` (a callable on an RGB PIL image returning an array [H, W, 3]). Picklable: it travels to the loader
    processes. A subclass that reads other items (services/video/loading.py: clips) overrides `load`."""

    def __init__(self, paths: Sequence[Item], batches: Sequence[np.ndarray], pil: Any, skip_corrupt: bool) -> None:
        self.paths, self.batches, self.pil, self.skip_corrupt = paths, batches, pil, skip_corrupt
        self.draft = draft_size(pil)  # JPEGs far larger than the transform needs are decoded at a fraction of the size

    def __len__(self) -> int:
        return len(self.batches)

    def load(self, i: int, data: bytes | None = None) -> tuple[np.ndarray, str | None]:
        """Item `i` of `paths` as a uint8 array, and a note for the job's events (or None); DatasetError if corrupt.
        `data`: its bytes, when the batch read them already (`read_together`)."""
        return np.asarray(self.pil(load_image(self.paths[i], self.draft, data)), dtype=np.uint8), None

    def _try_load(self, i: int, data: bytes | None = None) -> tuple[np.ndarray | None, str | None, str | None]:
        try:
            return (*self.load(i, data), None)
        except DatasetError as e:
            return None, None, str(e)

    def __getitem__(self, k: int) -> ImageBatch:
        try:
            return self.decode(k, map)
        except StoreUnavailable as e:  # an object store's outage: returned, raised by `iterate` as it came
            return ImageBatch(
                None, np.zeros(len(self.batches[k]), bool), [], np.asarray(self.batches[k]), [], [], str(e)
            )

    def decode(self, k: int, map_fn: Callable = map) -> ImageBatch:
        """Batch k, its items loaded through `map_fn` (`map`; or a thread pool's, which decodes them in parallel:
        Pillow releases the GIL while it decodes and resizes)."""
        positions = np.asarray(self.batches[k])
        images: list[np.ndarray | None] = []
        errors: list[str] = []
        notes: list[str] = []
        fetched = read_together(self.paths, positions.tolist())  # a shard's run of samples in one request
        for image, note, error in map_fn(lambda i: self._try_load(i, fetched.get(i)), positions.tolist()):
            if error is not None:
                if not self.skip_corrupt:
                    # returned, not raised: the DataLoader would wrap it in a traceback of the worker
                    return ImageBatch(None, np.zeros(len(positions), bool), [error], positions)
                errors.append(error)
            images.append(image)
            if note:
                notes.append(note)
        valid = np.array([im is not None for im in images])
        ok = next((im for im in images if im is not None), None)
        if ok is None:
            return ImageBatch(None, valid, errors, positions, notes)
        stacked = np.stack([im if im is not None else np.zeros_like(ok) for im in images])
        return ImageBatch(torch.from_numpy(stacked), valid, errors, positions, notes)


JPEG_MAGIC = b"\xff\xd8\xff"


def jpeg_header(data: bytes, path: Item) -> int:
    """A JPEG's EXIF orientation, after checking its pixel count against the limit that decoding by Pillow enforces
    (services/data/images.py), both from its header."""
    try:
        pixels, orientation = header(data)
    except ImageError as e:
        raise DatasetError(f"{path}: {e}") from None
    if pixels > MAX_IMAGE_PIXELS:
        raise DatasetError(f"{path}: image too large ({pixels:,} pixels; at most {MAX_IMAGE_PIXELS:,})")
    return orientation


class EncodedReader(BatchReader):
    """For decoding on the device (`extraction.decode = "device"`): item k holds batch k's JPEG files as their bytes
    (uint8 tensors, decoded later by nvJPEG, batched) and any other image decoded here by Pillow at full size
    ([3, H, W] uint8); `images` is a list of those, resized on the device by `decode_on_device`."""

    def decode(self, k: int, map_fn: Callable = map) -> ImageBatch:  # reading bytes: one thread is enough
        positions = np.asarray(self.batches[k])
        items: list[torch.Tensor | None] = []
        errors: list[str] = []
        orientations: list[int] = []
        fetched = read_together(self.paths, positions.tolist())
        for i in positions.tolist():
            try:
                item = self.paths[i]
                data = fetched.get(i) or (item.read_bytes() if isinstance(item, InFile) else Path(item).read_bytes())
                if data.startswith(JPEG_MAGIC):
                    orientation = jpeg_header(data, self.paths[i])  # before the device decodes it
                    items.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                    orientations.append(orientation)
                else:
                    items.append(torch.from_numpy(np.array(load_image(data), np.uint8)).permute(2, 0, 1))
                    orientations.append(1)  # upright already
            except (DatasetError, OSError) as e:
                if not self.skip_corrupt:
                    return ImageBatch(None, np.zeros(len(positions), bool), [f"{self.paths[i]}: {e}"], positions)
                items.append(None)
                errors.append(f"{self.paths[i]}: {e}")
        valid = np.array([it is not None for it in items])
        return ImageBatch(
            [it for it in items if it is not None] or None, valid, errors, positions, orientations=orientations
        )


def decode_on_device(
    batch: ImageBatch, paths: Sequence[Item], resize: Any, device: torch.device, skip_corrupt: bool
) -> ImageBatch:
    """An EncodedReader batch -> the uint8 [B, H, W, 3] batch on `device`: JPEGs decoded there in one call, every
    image resized and cropped there by `resize` (the eval transform's torchvision Resize and CenterCrop, which take
    [3, H, W] tensors); a row that holds no image is zeros, as the loaders' batches have it. A JPEG that does not
    decode is corrupt like any unreadable file: named in `errors`, or a DatasetError without `skip_corrupt`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if batch.images is None:
        return batch
    items, rows = list(batch.images), np.flatnonzero(batch.valid)
    encoded = [j for j, it in enumerate(items) if it.dim() == 1]
    decoded: dict[int, torch.Tensor] = {}
    try:
        decoded = dict(
            zip(encoded, decode_jpeg([items[j] for j in encoded], mode=ImageReadMode.RGB, device=device), strict=True)
        )
    except RuntimeError:  # one bad file fails the batched call: decode one by one to name it
        for j in encoded:
            try:
                decoded[j] = decode_jpeg(items[j], mode=ImageReadMode.RGB, device=device)
            except RuntimeError as e:
                message = f"{paths[batch.positions[rows[j]]]}: not a readable JPEG ({e})"
                if not skip_corrupt:
                    raise DatasetError(message) from None
                batch.valid[rows[j]] = False
                batch.errors.append(message)
    # EXIF orientation applied here on any device (decode_jpeg's own applies on the CPU only), as Pillow applies it
    decoded = {j: orient(image, batch.orientations[j]) for j, image in decoded.items()}
    resized = {
        rows[j]: resize(decoded[j] if it.dim() == 1 else it.to(device, non_blocking=True))
        for j, it in enumerate(items)
        if it.dim() != 1 or j in decoded
    }
    if not resized:
        batch.images = None
        return batch
    first = next(iter(resized.values()))
    out = torch.zeros((len(batch.valid), *first.shape), dtype=torch.uint8, device=device)
    for row, image in resized.items():
        out[row] = image
    batch.images = out.permute(0, 2, 3, 1)
    return batch


def _exit_with(owner: int, _worker_id: int) -> None:
    """DataLoader worker init: one torch thread (the DataLoader sets it too), and a thread that ends this worker as
    soon as `owner` (the process that iterates the loader) ends, however it ends. Neither the DataLoader's own check
    (its parent's pid) nor PR_SET_PDEATHSIG sees that here: the parent is the forkserver, which in turn lives as long
    as any worker holds its liveness pipe, so after a SIGKILL of the owner all of them would live on."""
    torch.set_num_threads(1)
    threading.Thread(target=_wait_for_exit, args=(owner,), daemon=True, name="owner-watch").start()


def _wait_for_exit(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)  # Linux: readable once the process has ended
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (another OS, an old kernel): poll
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            time.sleep(0.5)
    select.select([fd], [], [])
    os._exit(1)  # no cleanup: the owner is gone, and nobody reads what this worker would still produce


def _context() -> multiprocessing.context.BaseContext:
    """A forkserver: forking this process would copy its threads' state (zarr's event loop, CUDA, locks held by
    other threads); the server is forked once, clean, with torch and Pillow imported, and forks each worker."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        [
            "torch",
            "torchvision.transforms",
            "timm.data",
            "PIL.Image",
            "services.data.loading",
            "services.video.loading",
            "av",
        ]
    )
    return ctx


def iterate(reader: BatchReader, workers: int, pin_memory: bool = False, threads: int = 1) -> Iterator[ImageBatch]:
    """The reader's batches in order, loaded by `workers` processes (0: one thread, one batch ahead; or, with
    `threads` > 1, each batch decoded by that many threads when it is asked for: for a model on the CPU, which then
    has every core between two batches instead of losing one to a decoder at every barrier of its own threads). A
    corrupt image under `skip_corrupt=False` raises DatasetError naming it, here, with no worker traceback around it;
    an object store that does not answer for an item, StoreUnavailable naming it (the step is then retried)."""
    for batch in _raw(reader, workers, pin_memory, threads):
        if batch.unavailable is not None:
            raise StoreUnavailable(batch.unavailable)
        if batch.images is None and not batch.valid.any() and batch.errors and not reader.skip_corrupt:
            raise DatasetError(batch.errors[0])
        yield batch


def _raw(reader: BatchReader, workers: int, pin_memory: bool, threads: int) -> Iterator[ImageBatch]:
    if len(reader) == 0:
        return
    if workers <= 0 and threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            for k in range(len(reader)):
                batch = reader.decode(k, pool.map)
                yield batch.pin_memory() if pin_memory else batch
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
        reader,
        batch_size=None,
        shuffle=False,
        num_workers=min(workers, len(reader)),
        pin_memory=pin_memory,
        worker_init_fn=partial(_exit_with, os.getpid()),
        multiprocessing_context=_context(),
        prefetch_factor=2,
    )
    batches = iter(loader)
    try:
        yield from batches
    finally:
        del batches  # the DataLoader's iterator shuts its workers down when it is collected


def to_input(
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> the normalised batch [B, 3, H, W] on `device` in `dtype`, computed in float32 as
    ToTensor + Normalize compute it (bit-equal on the CPU), then cast."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    x = x.sub_(mean.to(device)).div_(std.to(device))
    return x if dtype == torch.float32 else x.to(dtype)
