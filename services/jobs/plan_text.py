"""The plan as text (`describe`, for `sidetune plan`) and the size and time formats the planner's messages use.
Sizes are decimal (1 GB = 10^9 bytes)."""

from __future__ import annotations

import numpy as np

from services.jobs.plan import Plan
from services.modality import Modality

GB = 10**9


def gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def human_bytes(n: float) -> str:
    for unit, size in (("TB", 10**12), ("GB", GB), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def describe(p: Plan, modality: Modality) -> str:
    """The plan as readable lines, for `sidetune plan` (`modality`: the job's kind of input)."""
    a = p.architecture
    item = modality.items
    split = f"{p.images} {item}, {p.classes} classes ({p.train_images} train, {p.val_images} val"
    split += f", {p.test_images} test)" if p.test_images else ")"
    rows = [("job", f"{p.method} on {p.backbone}, mode {p.mode}"), ("dataset", split)]
    if p.configurations > 1:
        rows.append(("sweep", f"{p.configurations} configurations, trained together from one pass per epoch"))
    if a is not None:
        rows.append(
            (
                "backbone",
                f"{modality.backbone_words()}{a.num_layers} blocks, {a.tokens} tokens ({a.num_prefix_tokens} prefix), "
                f"dim {a.dim}, {a.image_size} px, patch {a.patch_size}",
            )
        )
    if p.backprop_memory_bytes is not None:
        verdict = {True: "fits", False: "does NOT fit", None: "not checked"}[p.memory_fits]
        rows.append(
            (
                "memory",
                f"~{gb(p.backprop_memory_bytes)} on the device to train through the backbone "
                f"({verdict}: SIDETUNE_DEVICE_MEMORY_GB)",
            )
        )
    if p.cache_bytes is not None:
        rows.append(
            (
                "cache",
                f"blocks {_ranges(p.cached_layers or [])}, {p.cached_token_mode} tokens: "
                f"{human_bytes(p.bytes_per_image or 0)} per {item[:-1]}, {gb(p.cache_bytes)} in all "
                "(uncompressed, an upper bound)",
            )
        )
        if p.expected_cache_bytes != p.cache_bytes:
            rows.append(("", f"about {gb(p.expected_cache_bytes or 0)} with the lossy codec (a rough estimate)"))
    quota = "none (the free disk space)" if p.quota_bytes is None else gb(p.quota_bytes)
    free = "no free-space figure (an object store)" if p.free_disk_bytes is None else f"{gb(p.free_disk_bytes)} free"
    available = "no limit" if p.available_bytes is None else gb(p.available_bytes)
    rows.append(
        (
            "disk",
            f"quota {quota}; cache uses {gb(p.cache_used_bytes)} ({gb(p.cache_evictable_bytes)} "
            f"evictable); {free}; available {available}",
        )
    )
    verdict = {True: "yes", False: "NO", None: "unknown"}[p.fits]
    if p.fits and p.evict_entries:
        verdict += f", after evicting {gb(p.evict_bytes)} ({p.evict_entries} entries)"
    rows.append(("fits", verdict))
    if p.train_feature_bytes is not None:
        where = "GPU-resident" if p.train_on_gpu else "in memory" if p.train_in_memory else "streamed from the cache"
        if p.train_on_gpu is None and p.train_in_memory:
            where = "in memory, GPU-resident if the worker's device has room"
        gpu = "the device's free memory" if p.gpu_budget_bytes is None else gb(p.gpu_budget_bytes)
        budgets = f"budgets: {gb(p.train_memory_budget_bytes)} in memory, {gpu} on the GPU"
        rows.append(
            ("training", f"{gb(p.train_feature_bytes)} of features for {p.train_images} {item}: {where} ({budgets})")
        )
    if p.extraction_s is not None:
        rows.append(
            (
                "extraction",
                f"~{human_seconds(p.extraction_s)}: {p.extraction_flops or 0:.3g} FLOPs, "
                f"{human_seconds(p.extraction_compute_s or 0)} at an assumed {p.assumed_tflops:g} "
                f"TFLOP/s; writes {human_seconds(p.extraction_write_s or 0)} at an assumed "
                f"{p.assumed_disk_mb_s:g} MB/s",
            )
        )
    lines = [f"{k:<11} {v}" for k, v in rows]
    lines.append(p.message)
    lines += [f"note: {note}" for note in p.notes]
    return "\n".join(lines)


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, arr = [], np.asarray(sorted(values))
    if not len(arr):
        return "none"
    breaks = np.flatnonzero(np.diff(arr) != 1)
    for start, stop in zip(np.r_[0, breaks + 1], np.r_[breaks, len(arr) - 1], strict=True):
        out.append(str(arr[start]) if start == stop else f"{arr[start]}-{arr[stop]}")
    return ", ".join(out)
