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

from services.backbones import Backbone, load_backbone
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


def prepare(spec: JobSpec, settings: Settings) -> Prepared:
    """Read the dataset, create the backbone and find the cache entry (no forward pass): a complete entry of the
    same family that covers what the job reads, else the entry this job's extraction will write."""
    root = check_path(spec.dataset.path, settings.roots)
    dataset = read_dataset(root, spec.dataset.format)
    checkpoint = check_path(spec.backbone.checkpoint, settings.roots) if spec.backbone.checkpoint else None
    backbone = load_backbone(spec.backbone, settings.torch_device(), checkpoint)
    family = cache_key({"dataset": dataset.fingerprint, "backbone": spec.backbone.name,
                        "weights": backbone.weights_hash, "preprocessing": backbone.data_config})  # fmt: skip
    layers, tokens = spec.cached_layers_and_tokens(backbone.num_layers, backbone.model.global_pool)
    cache = FeatureCache(settings.cache_dir)
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
    images, valid, bad = [], [], []
    for i in range(start, stop):
        try:
            images.append(transform(load_image(dataset.paths[i])))
            valid.append(True)
        except DatasetError as e:
            if not skip_corrupt:
                raise
            images.append(None)
            valid.append(False)
            bad.append(str(e))
    shape = next((im.shape for im in images if im is not None), None)
    if shape is None:
        return None, np.array(valid), bad
    batch = torch.stack([im if im is not None else torch.zeros(shape) for im in images])
    return batch, np.array(valid), bad


def run_extraction(spec: JobSpec, settings: Settings, reporter: Reporter) -> dict[str, Any]:
    t0 = time.perf_counter()
    prep = prepare(spec, settings)
    entry, backbone, dataset = prep.entry, prep.backbone, prep.dataset
    if entry.is_complete:
        entry.touch()
        reporter.event(f"reusing the feature cache {prep.key}: no backbone forward needed", data={"cache": prep.key})
        return {"cache_key": prep.key, "cache_hit": True, "backbone_forwards": 0, "images": len(dataset),
                "extract_seconds": round(time.perf_counter() - t0, 3), **entry.summary}  # fmt: skip

    bs = spec.extraction.batch_size
    meta = {**backbone.info(), "dataset_root": str(dataset.root), "dataset_fingerprint": dataset.fingerprint,
            "classes": dataset.classes}  # fmt: skip
    entry.create(labels=dataset.labels, layers=prep.layers, tokens=prep.tokens, token_count=backbone.tokens,
                 dim=backbone.dim, batch_size=bs, meta=meta, codec=spec.extraction.codec,
                 keepbits=spec.extraction.keepbits)  # fmt: skip
    entry.save_readout(backbone.readout_tensors())
    pending = entry.pending_batches()
    n_batches = -(-len(dataset) // bs)
    if len(pending) < n_batches:
        reporter.event(f"resuming extraction: {n_batches - len(pending)} of {n_batches} batches already cached")
    reporter.event(f"extracting {len(dataset)} images with {spec.backbone.name} into cache {prep.key}")

    layers, tokens = entry.layers, entry.meta["token_mode"]
    shape = entry.meta["shape"]
    skip = spec.dataset.on_corrupt == "skip"
    forwards, images_done = 0, 0
    t_fwd = time.perf_counter()
    with ThreadPoolExecutor(1) as loader, ThreadPoolExecutor(1) as writer:
        next_load: Future | None = None
        write: Future | None = None
        for k, batch_index in enumerate(pending):
            start, stop = entry.batch_range(batch_index)
            if next_load is None:
                next_load = loader.submit(_load_batch, dataset, backbone.transform, start, stop, skip)
            images, valid, bad = next_load.result()
            if k + 1 < len(pending):  # decode the next batch while this one runs
                s2, e2 = entry.batch_range(pending[k + 1])
                next_load = loader.submit(_load_batch, dataset, backbone.transform, s2, e2, skip)
            if images is None:
                acts = np.zeros((stop - start, *shape[1:]), np.float16)
            else:
                feats = pool_tokens(backbone.intermediates(images, layers), tokens, backbone.num_prefix_tokens)
                acts = feats.to(torch.float16).cpu().numpy()
                forwards += 1
            for msg in bad:
                reporter.event(f"skipped a corrupt image: {msg}", level="warning")
            if write is not None:
                write.result()  # one write in flight at most (double buffering)
            write = writer.submit(entry.write_batch, batch_index, acts, valid)
            images_done += stop - start
            reporter.progress("extracting", k + 1, len(pending), images=images_done)
            reporter.check_cancel()
        if write is not None:
            write.result()
    seconds = time.perf_counter() - t_fwd
    # From the stored `valid` flags, not this run's list: a resumed extraction keeps earlier batches' skips.
    skipped = [str(dataset.paths[i]) for i in np.flatnonzero(~entry.valid())]
    size = entry.nbytes()
    summary = {"skipped": skipped, "bytes": size, "bytes_per_image": size // max(1, len(dataset))}
    entry.mark_complete(summary)
    entry.touch()
    reporter.event(f"extracted {images_done} images in {seconds:.1f}s ({images_done / max(seconds, 1e-9):.1f} img/s)")
    return {"cache_key": prep.key, "cache_hit": False, "backbone_forwards": forwards, "images": len(dataset),
            "extract_seconds": round(time.perf_counter() - t0, 3),
            "extract_images_per_s": round(images_done / max(seconds, 1e-9), 2), **summary}  # fmt: skip
