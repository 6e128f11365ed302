"""Feature extraction: run the frozen backbone once per image and write per-layer activations to the cache.

Skips entirely when the cache entry for the same key is complete (no backbone forward). Otherwise writes
the batches still missing, so a crashed extraction resumes from the last complete batch. Loader processes decode
ahead of the backbone and the writer writes behind it, several batches at a time, so the backbone waits on neither
while they keep up (bench/cache.py measures each stage alone against the whole).
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch

from services.backbones import Backbone, load_backbone
from services.data.datasets import Dataset, read_for_job
from services.data.formats.left_out import left_out_data
from services.data.images import PIXELS
from services.data.loading import cpu_threads_beside, decode_on_device, iterate, loader_workers
from services.jobs.progress import Reporter
from services.modality import modality_for
from services.paths import UserPaths
from services.spec import JobSpec
from services.video.loading import padding_event
from storage.cache import CacheEntry, FeatureCache, cache_key, pool_tokens
from storage.cache.meta import EntrySummary
from storage.cache.writer import ShardWriter
from storage.faults import naming_disk_full
from storage.settings import Settings

if TYPE_CHECKING:
    from services.jobs.resolved import ResolvedJob


@dataclass
class Prepared:
    dataset: Dataset
    backbone: Backbone
    key: str
    entry: CacheEntry
    layers: list[int]  # the blocks to cache
    tokens: str  # all, cls or mean
    batch_size: int  # extraction.batch_size resolved (images or clips per forward and shard)


def prepare(spec: JobSpec, settings: Settings, key: str | None = None, resolved: ResolvedJob | None = None) -> Prepared:
    """Read the dataset, create the backbone and find the cache entry (no forward pass): `key` if given (a shard
    of an extraction in progress), else a complete entry of the same family that covers what the job reads,
    else the entry this job's extraction will write. The layers and tokens to cache are the resolved job's, when it
    has them (services/jobs/resolved.py)."""
    paths = UserPaths(settings)
    dataset = read_for_job(spec.dataset, paths)
    modality = modality_for(spec.backbone)
    modality.check_dataset(dataset.kind, spec.dataset.path)
    modality.check_decode(spec.extraction.decode)
    backbone = load_backbone(spec.backbone, settings.torch_device(), paths.checkpoint(spec.backbone))
    preprocessing = {
        **backbone.data_config,
        "decode": spec.extraction.decode,
        "pixels": PIXELS,
        **modality.cache_identity(),
    }
    family = cache_key(
        {
            "dataset": dataset.fingerprint,
            "backbone": spec.backbone.name,
            "weights": backbone.weights_hash,
            "preprocessing": preprocessing,
            "precision": backbone.precision,
        }
    )
    if resolved is not None and resolved.cached_layers is not None:
        layers, tokens = resolved.cached_layers, resolved.cached_token_mode
    else:  # a backbone outside the planner's table: known from the model only
        layers, tokens = spec.cached_layers_and_tokens(backbone.num_layers, backbone.model.global_pool)
    per_item = len(layers) * (backbone.tokens if tokens == "all" else 1) * backbone.dim * 2
    rows = modality.extraction_rows(spec.extraction.batch_size, per_item)
    cache = FeatureCache(settings.cache_location)
    if key is not None:
        return Prepared(dataset, backbone, key, cache.entry(key), layers, tokens, rows)
    needed, _ = spec.method_needs(backbone.num_layers, backbone.model.global_pool)
    found = cache.find(family, needed, tokens)
    if found is not None:
        return Prepared(dataset, backbone, found.key, found, layers, tokens, found.meta.get("batch_size", rows))
    ext = spec.extraction
    variant = cache_key(
        {
            "layers": layers,
            "tokens": tokens,
            "dtype": "float16",
            "rows": rows,
            "codec": ext.codec,
            "keepbits": ext.keepbits,
        }
    )
    key = f"{family}/{variant}"
    return Prepared(dataset, backbone, key, cache.entry(key), layers, tokens, rows)


def writing(prep: Prepared) -> contextlib.AbstractContextManager[None]:
    """Around the entry's writes: a full disk is DiskFull naming the cache's directory and about how many bytes the
    entry still needed (its planned size less what is written)."""
    root = prep.entry.root.removesuffix(prep.key).rstrip("/") or prep.entry.root
    return naming_disk_full(
        root, f"the feature cache entry {prep.key}", lambda: max(0, planned_bytes(prep) - prep.entry.nbytes())
    )


def begin_extraction(
    spec: JobSpec,
    settings: Settings,
    reporter: Reporter,
    key: str | None = None,
    prep: Prepared | None = None,
    resolved: ResolvedJob | None = None,
) -> Prepared:
    """Prepare (unless given) and, unless the entry is complete already, create it (or keep it, to resume) with
    its readout."""
    prep = prep or prepare(spec, settings, key, resolved)
    entry, backbone, dataset = prep.entry, prep.backbone, prep.dataset
    if entry.is_complete:
        return prep
    meta = {
        **backbone.info(),
        "dataset_root": str(dataset.root),
        "dataset_fingerprint": dataset.fingerprint,
        "classes": dataset.classes,
        "skipped_rows": list(dataset.left_out.notes),  # the first few; `left_out` counts them all
        "left_out": dict(dataset.left_out.counts),
    }
    if dataset.left_out:
        reporter.event(dataset.left_out.text(), level="warning", data=left_out_data(dataset.left_out))
    with writing(prep):
        entry.create(
            labels=dataset.labels,
            layers=prep.layers,
            tokens=prep.tokens,
            token_count=backbone.tokens,
            dim=backbone.dim,
            batch_size=prep.batch_size,
            meta=meta,
            codec=spec.extraction.codec,
            keepbits=spec.extraction.keepbits,
        )
        if not entry.has_readout:
            entry.save_readout(backbone.readout_tensors())
    return prep


class _HostBuffers:
    """Device -> host copies of the activations. On a GPU: into a ring of pinned buffers, on a side stream of the
    activations' own device (so the next forward is not queued behind the copy), with an event recorded on that
    stream that the writer thread waits on before reading; a buffer is reused once the writer has let it go. On the
    CPU: the float16 tensor itself (a new one per batch)."""

    def __init__(self, device: torch.device, slots: int) -> None:
        self.cuda = device.type == "cuda"
        self.slots = slots
        self.free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        self.shape: tuple[int, ...] | None = None
        self.rows = 0
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def copy(self, feats: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None] | None, Callable[[], None] | None]:
        """(host tensor, wait for it to be filled, give it back) for `feats`."""
        feats = feats.to(torch.float16)
        if not self.cuda:
            return feats, None, None
        if self.shape != tuple(feats.shape[1:]) or self.rows < len(feats):
            self.shape, self.rows = tuple(feats.shape[1:]), len(feats)
            self.free = queue.SimpleQueue()
            for _ in range(self.slots):
                self.free.put(torch.empty(feats.shape, dtype=torch.float16, pin_memory=True))
        buffer = self.free.get()  # blocks while every buffer is still being written
        host = buffer[: len(feats)]
        with torch.cuda.device(feats.device):
            self.stream.wait_stream(torch.cuda.current_stream(feats.device))  # the forward that made feats
            with torch.cuda.stream(self.stream):
                host.copy_(feats, non_blocking=True)
                feats.record_stream(self.stream)  # not reused by the allocator before the copy ends
                event = torch.cuda.Event()
                event.record(self.stream)
        return host, event.synchronize, lambda: self.free.put(buffer)


class BatchesRun(TypedDict):
    """What one run of `extract_batches` did (a shard's, or the whole extraction's)."""

    backbone_forwards: int
    images_extracted: int
    seconds: float
    loader_workers: int
    writer: str  # the writer's engine (storage/cache/writer.py)


def extract_batches(
    prep: Prepared, spec: JobSpec, reporter: Reporter, batches: list[int], settings: Settings | None = None
) -> BatchesRun:
    """Run the backbone on `batches` (indices of the entry's extraction batches) and write each one whole. Loader
    processes decode ahead (services/data/loading.py) and the writer writes several batches at once behind the forward
    (storage/cache/writer.py), so the backbone waits on neither while they keep up."""
    settings = settings or Settings()
    entry, backbone, dataset = prep.entry, prep.backbone, prep.dataset
    layers, tokens, shape = entry.layers, entry.meta["token_mode"], entry.meta["shape"]
    total = len(entry.pending_batches()) if batches else 0
    n_batches = -(-shape[0] // entry.meta["batch_size"])
    rows = [np.arange(*entry.batch_range(b)) for b in batches]
    skip, on_device = spec.dataset.on_corrupt == "skip", spec.extraction.decode == "device"
    reader = modality_for(spec.backbone).reader(dataset, rows, backbone, skip, on_device)
    workers = loader_workers(settings, len(dataset), backbone.device)
    writer = ShardWriter(entry, settings.cache_writers)
    host = _HostBuffers(backbone.device, settings.cache_writers + 1)
    forwards, images_done = 0, 0
    t0 = time.perf_counter()
    cpu = backbone.device.type == "cpu"  # a model on the CPU decodes between forwards, on its own threads
    loading = iterate(
        reader, workers, pin_memory=backbone.device.type == "cuda", threads=torch.get_num_threads() if cpu else 1
    )
    with writing(prep), writer, contextlib.closing(loading) as loaded, cpu_threads_beside(workers, backbone.device):
        for k, (batch_index, batch) in enumerate(zip(batches, loaded, strict=True)):
            start, stop = entry.batch_range(batch_index)
            if on_device:
                batch = decode_on_device(batch, dataset.paths, backbone.split.pil, backbone.device, skip)
            if batch.images is None:
                acts, ready, done = torch.zeros((stop - start, *shape[1:]), dtype=torch.float16), None, None
            else:
                # all tokens: stored as they come, so float16 straight from the forward; pooled ones in full precision
                dtype = torch.float16 if tokens == "all" else None
                feats = backbone.intermediates(backbone.input(batch.images), layers, dtype)
                acts, ready, done = host.copy(pool_tokens(feats, tokens, backbone.num_prefix_tokens))
                forwards += 1
            for msg in batch.errors:
                reporter.event(f"skipped a corrupt {dataset.kind}: {msg}", level="warning")
            if padded := padding_event(batch.notes):
                reporter.event(padded, level="warning")
            writer.submit(batch_index, acts, batch.valid, ready, done)
            images_done += stop - start
            done_batches = n_batches - total + k + 1  # across every shard, approximately: others write concurrently
            rate = round(images_done / max(time.perf_counter() - t0, 1e-9), 2)  # this task's, for /metrics
            reporter.progress("extracting", done_batches, n_batches, images=images_done, images_per_s=rate)
            reporter.check_cancel()
    seconds = time.perf_counter() - t0
    return BatchesRun(
        backbone_forwards=forwards,
        images_extracted=images_done,
        seconds=seconds,
        loader_workers=workers,
        writer=writer.engine,
    )


def finish_extraction(prep: Prepared) -> EntrySummary:
    """Mark a fully written entry complete (idempotent); returns its summary."""
    entry, dataset = prep.entry, prep.dataset
    if not entry.is_complete:
        # From the stored `valid` flags, not one run's list: resumed and sharded runs keep every batch's skips.
        skipped = [str(dataset.paths[i]) for i in np.flatnonzero(~entry.valid())]
        size = entry.nbytes()
        with writing(prep):
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
    n_batches = -(-len(prep.dataset) // prep.batch_size)
    if len(pending) < n_batches:
        reporter.event(f"resuming extraction: {n_batches - len(pending)} of {n_batches} batches already cached")
    what = modality_for(spec.backbone).items
    reporter.event(f"extracting {len(prep.dataset)} {what} with {spec.backbone.name} into cache {prep.key}")
    run = extract_batches(prep, spec, reporter, pending, settings)
    summary = finish_extraction(prep)
    rate = run["images_extracted"] / max(run["seconds"], 1e-9)
    reporter.event(f"extracted {run['images_extracted']} images in {run['seconds']:.1f}s ({rate:.1f} img/s)")
    return {
        **base,
        "cache_hit": False,
        "backbone_forwards": run["backbone_forwards"],
        "extract_seconds": round(time.perf_counter() - t0, 3),
        "extract_images_per_s": round(rate, 2),
        "loader_workers": run["loader_workers"],
        "writer": run["writer"],
        **summary,
    }
