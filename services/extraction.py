"""Feature extraction: run the frozen backbone once per image and write per-layer activations to the cache.

Skips entirely when the cache entry for the same key is complete (no backbone forward). Otherwise writes
the batches still missing, so a crashed extraction resumes from the last complete batch. Image decoding
runs one batch ahead in a thread, and cache writes run one batch behind in another, so the backbone does
not wait on either.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from services.backbones import Backbone, SplitTransform, load_backbone
from services.datasets import Dataset, DatasetError, check_path, load_image, read_dataset
from services.progress import Reporter
from services.spec import JobSpec
from storage.cache import CacheEntry, FeatureCache, cache_key, pool_tokens
from storage.settings import Settings


@dataclass
class Prepared:
    dataset: Dataset
    backbone: Backbone
    key: str
    entry: CacheEntry
    layers: list[int]  # the blocks to cache
    tokens: str  # all, cls or mean


def prepare(spec: JobSpec, settings: Settings, key: str | None = None) -> Prepared:
    """Read the dataset, create the backbone and find the cache entry (no forward pass): `key` if given (a shard
    of an extraction in progress), else a complete entry of the same family that covers what the job reads,
    else the entry this job's extraction will write."""
    root = check_path(spec.dataset.path, settings.roots)
    dataset = read_dataset(root, spec.dataset.format, spec.dataset.multi_label, spec.dataset.on_corrupt)
    checkpoint = check_path(spec.backbone.checkpoint, settings.roots) if spec.backbone.checkpoint else None
    backbone = load_backbone(spec.backbone, settings.torch_device(), checkpoint)
    family = cache_key({"dataset": dataset.fingerprint, "backbone": spec.backbone.name,
                        "weights": backbone.weights_hash, "preprocessing": backbone.data_config})  # fmt: skip
    layers, tokens = spec.cached_layers_and_tokens(backbone.num_layers, backbone.model.global_pool)
    cache = FeatureCache(settings.cache_location)
    if key is not None:
        return Prepared(dataset, backbone, key, cache.entry(key), layers, tokens)
    needed, _ = spec.method_needs(backbone.num_layers, backbone.model.global_pool)
    found = cache.find(family, needed, tokens)
    if found is not None:
        return Prepared(dataset, backbone, found.key, found, layers, tokens)
    ext = spec.extraction
    variant = cache_key({"layers": layers, "tokens": tokens, "dtype": "float16", "rows": ext.batch_size,
                         "codec": ext.codec, "keepbits": ext.keepbits})  # fmt: skip
    key = f"{family}/{variant}"
    return Prepared(dataset, backbone, key, cache.entry(key), layers, tokens)


def _load_batch(dataset: Dataset, transform: Any, start: int, stop: int, skip_corrupt: bool):
    """Decode images [start, stop) in a loader thread; returns (batch or None if every image was corrupt, valid
    flags, messages for the corrupt ones). With a `SplitTransform` layout the batch is uint8 and `_as_input` makes it
    a tensor in the model's thread; otherwise the whole transform runs here."""
    split = SplitTransform.of(transform)
    images, valid, bad = [], [], []
    for i in range(start, stop):
        try:
            image = load_image(dataset.paths[i])
            images.append(split.load(image) if split else transform(image))
            valid.append(True)
        except DatasetError as e:
            if not skip_corrupt:
                raise
            images.append(None)
            valid.append(False)
            bad.append(str(e))
    ok = next((im for im in images if im is not None), None)
    if ok is None:
        return None, np.array(valid), bad
    if split:
        return np.stack([im if im is not None else np.zeros_like(ok) for im in images]), np.array(valid), bad
    return torch.stack([im if im is not None else torch.zeros_like(ok) for im in images]), np.array(valid), bad


def _as_input(transform: Any, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A batch from `_load_batch` as the model's input (this runs in the model's thread)."""
    split = SplitTransform.of(transform)
    return split.to_input(batch) if split and isinstance(batch, np.ndarray) else batch


def begin_extraction(
    spec: JobSpec, settings: Settings, reporter: Reporter, key: str | None = None, prep: Prepared | None = None
) -> Prepared:
    """Prepare (unless given) and, unless the entry is complete already, create it (or keep it, to resume) with
    its readout."""
    prep = prep or prepare(spec, settings, key)
    entry, backbone, dataset = prep.entry, prep.backbone, prep.dataset
    if entry.is_complete:
        return prep
    meta = {**backbone.info(), "dataset_root": str(dataset.root), "dataset_fingerprint": dataset.fingerprint,
            "classes": dataset.classes, "skipped_rows": list(dataset.skipped_rows)}  # fmt: skip
    if dataset.skipped_rows:
        reporter.event(f"left out {len(dataset.skipped_rows)} manifest rows without a tag (on_corrupt=skip), e.g. "
                       f"{dataset.skipped_rows[0]}", level="warning")  # fmt: skip
    entry.create(labels=dataset.labels, layers=prep.layers, tokens=prep.tokens, token_count=backbone.tokens,
                 dim=backbone.dim, batch_size=spec.extraction.batch_size, meta=meta, codec=spec.extraction.codec,
                 keepbits=spec.extraction.keepbits)  # fmt: skip
    if not entry.has_readout:
        entry.save_readout(backbone.readout_tensors())
    return prep


class _HostBuffers:
    """Device -> host copies of the activations: on a GPU into two alternating pinned buffers, asynchronously
    (the writer thread waits on the copy's event), so the next forward starts while the last batch is copied
    and written; on the CPU a plain conversion."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.buffers: list[torch.Tensor] = []
        self.turn = 0

    def copy(self, feats: torch.Tensor) -> tuple[torch.Tensor, Any]:
        feats = feats.to(torch.float16)
        if not self.cuda:
            return feats, None
        if not self.buffers or self.buffers[0].shape[1:] != feats.shape[1:] or self.buffers[0].shape[0] < len(feats):
            self.buffers = [torch.empty(feats.shape, dtype=torch.float16, pin_memory=True) for _ in range(2)]
        host = self.buffers[self.turn][: len(feats)]
        self.turn ^= 1
        host.copy_(feats, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event


def _write(entry: CacheEntry, batch_index: int, host: torch.Tensor, event: Any, valid: np.ndarray) -> None:
    if event is not None:
        event.synchronize()
    entry.write_batch(batch_index, host.numpy(), valid)


def extract_batches(prep: Prepared, spec: JobSpec, reporter: Reporter, batches: list[int]) -> dict[str, Any]:
    """Run the backbone on `batches` (indices of the entry's extraction batches) and write each one whole.
    Decoding runs one batch ahead in a thread and writing one batch behind in another (double buffering)."""
    entry, backbone, dataset = prep.entry, prep.backbone, prep.dataset
    layers, tokens, shape = entry.layers, entry.meta["token_mode"], entry.meta["shape"]
    skip = spec.dataset.on_corrupt == "skip"
    total = len(entry.pending_batches()) if batches else 0
    n_batches = -(-shape[0] // entry.meta["batch_size"])
    host = _HostBuffers(backbone.device)
    forwards, images_done = 0, 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1) as loader, ThreadPoolExecutor(1) as writer:
        next_load: Future | None = None
        write: Future | None = None
        for k, batch_index in enumerate(batches):
            start, stop = entry.batch_range(batch_index)
            if next_load is None:
                next_load = loader.submit(_load_batch, dataset, backbone.transform, start, stop, skip)
            images, valid, bad = next_load.result()
            if k + 1 < len(batches):  # decode the next batch while this one runs
                s2, e2 = entry.batch_range(batches[k + 1])
                next_load = loader.submit(_load_batch, dataset, backbone.transform, s2, e2, skip)
            if images is None:
                acts, event = torch.zeros((stop - start, *shape[1:]), dtype=torch.float16), None
            else:
                # all tokens: stored as they come, so float16 straight from the forward; pooled ones in full precision
                dtype = torch.float16 if tokens == "all" else None
                feats = backbone.intermediates(_as_input(backbone.transform, images), layers, dtype)
                feats = pool_tokens(feats, tokens, backbone.num_prefix_tokens)
                acts, event = host.copy(feats)
                forwards += 1
            for msg in bad:
                reporter.event(f"skipped a corrupt image: {msg}", level="warning")
            if write is not None:
                write.result()  # one write in flight at most
            write = writer.submit(_write, entry, batch_index, acts, event, valid)
            images_done += stop - start
            done = n_batches - total + k + 1  # across every shard, approximately: others write concurrently
            rate = round(images_done / max(time.perf_counter() - t0, 1e-9), 2)  # this task's, for /metrics
            reporter.progress("extracting", done, n_batches, images=images_done, images_per_s=rate)
            reporter.check_cancel()
        if write is not None:
            write.result()
    seconds = time.perf_counter() - t0
    return {"backbone_forwards": forwards, "images_extracted": images_done, "seconds": seconds}


def finish_extraction(prep: Prepared) -> dict[str, Any]:
    """Mark a fully written entry complete (idempotent); returns its summary."""
    entry, dataset = prep.entry, prep.dataset
    if not entry.is_complete:
        # From the stored `valid` flags, not one run's list: resumed and sharded runs keep every batch's skips.
        skipped = [str(dataset.paths[i]) for i in np.flatnonzero(~entry.valid())]
        size = entry.nbytes()
        entry.mark_complete({"skipped": skipped, "bytes": size, "bytes_per_image": size // max(1, len(dataset))})
    entry.touch()
    return entry.summary


def shard_batches(pending: list[int], index: int, count: int) -> list[int]:
    """The batches shard `index` of `count` extracts: disjoint, so distinct writers write distinct shards."""
    return [b for b in pending if b % count == index]


def planned_bytes(prep: Prepared) -> int:
    """Uncompressed size of the entry `prep` would write (an upper bound with a codec)."""
    tokens = prep.backbone.tokens if prep.tokens == "all" else 1
    return len(prep.dataset) * len(prep.layers) * tokens * prep.backbone.dim * 2


def run_extraction(
    spec: JobSpec, settings: Settings, reporter: Reporter, prep: Prepared | None = None
) -> dict[str, Any]:
    """The whole extraction in this process: reuse a covering complete entry, else extract what is missing."""
    t0 = time.perf_counter()
    prep = begin_extraction(spec, settings, reporter, prep=prep)
    entry = prep.entry
    base = {"cache_key": prep.key, "images": len(prep.dataset)}
    if entry.is_complete:
        entry.touch()
        reporter.event(f"reusing the feature cache {prep.key}: no backbone forward needed", data={"cache": prep.key})
        seconds = round(time.perf_counter() - t0, 3)
        return {**base, "cache_hit": True, "backbone_forwards": 0, "extract_seconds": seconds, **entry.summary}
    pending = entry.pending_batches()
    n_batches = -(-len(prep.dataset) // spec.extraction.batch_size)
    if len(pending) < n_batches:
        reporter.event(f"resuming extraction: {n_batches - len(pending)} of {n_batches} batches already cached")
    reporter.event(f"extracting {len(prep.dataset)} images with {spec.backbone.name} into cache {prep.key}")
    run = extract_batches(prep, spec, reporter, pending)
    summary = finish_extraction(prep)
    rate = run["images_extracted"] / max(run["seconds"], 1e-9)
    reporter.event(f"extracted {run['images_extracted']} images in {run['seconds']:.1f}s ({rate:.1f} img/s)")
    return {**base, "cache_hit": False, "backbone_forwards": run["backbone_forwards"],
            "extract_seconds": round(time.perf_counter() - t0, 3), "extract_images_per_s": round(rate, 2),
            **summary}  # fmt: skip
