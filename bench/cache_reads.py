"""bench/cache.py, part (b): `CacheEntry.read()` MB/s (everything; random mini-batches) of the LoSA entries that part
(a) wrote, against a raw read of the same files and a plain zarr slice, with each codec's error.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from cache_extract import EXTRACT_ROWS, settings_for
from common import MB, fmt, median, ratio, render, say, spread


def raw_read(files: list[Path]) -> tuple[int, float]:
    t0 = time.perf_counter()
    total = 0
    for f in files:
        with open(f, "rb") as h:
            total += len(h.read())
    return total, time.perf_counter() - t0


def read_chars() -> int:
    """Bytes this process has passed through read() syscalls (page-cache hits included)."""
    import psutil

    return psutil.Process().io_counters().read_chars


def measure_entry(args: argparse.Namespace, entry, rounds: int) -> dict[str, Any]:
    import numpy as np
    import zarr

    files = sorted(f for f in entry.features.rglob("*") if f.is_file())
    raw_read(files)  # warm the page cache for both readers
    meta = entry.meta
    n = meta["shape"][0]
    r = {"raw": [], "all": [], "slice": [], "random": [], "amplification": [], "files": len(files)}
    r |= {"chunk_rows": meta["chunk_rows"], "disk_bytes": sum(f.stat().st_size for f in files)}
    rng = np.random.default_rng(0)
    batches = [rng.choice(n, size=min(args.read_batch, n), replace=False) for _ in range(args.read_batches)]
    for _ in range(rounds):
        size, seconds = raw_read(files)
        r["raw"].append(size / MB / seconds)
        t0 = time.perf_counter()
        acts = entry.read()
        r["all"].append(acts.nbytes / MB / (time.perf_counter() - t0))
        del acts
        # Reference: the same array through one basic zarr slice, without CacheEntry.read around it.
        t0 = time.perf_counter()
        acts = zarr.open_array(entry.features / "acts", mode="r")[:]
        r["slice"].append(acts.nbytes / MB / (time.perf_counter() - t0))
        del acts
        useful, before = 0, read_chars()
        t0 = time.perf_counter()
        for idx in batches:
            useful += entry.read(idx).nbytes
        seconds = time.perf_counter() - t0
        r["random"].append(useful / MB / seconds)
        r["amplification"].append((read_chars() - before) / useful)
    return r


def measure(args: argparse.Namespace, extraction: dict[str, Any]) -> dict[str, Any]:
    """Every LoSA entry of part (a): `--repeats` rounds for the headline (codec none), one for the others."""
    import numpy as np

    from storage.cache import FeatureCache

    entries = {}
    for name, dataset, method, *_ in EXTRACT_ROWS:
        if method == "losa" and dataset == "digits":
            key = extraction["ext"][name][-1]["cache_key"]
            entries[name] = FeatureCache(settings_for(args, name).cache_dir).entry(key)
    rows: dict[str, dict[str, Any]] = {}
    for name, entry in entries.items():
        r = rows[name] = measure_entry(args, entry, args.repeats if name == "losa none" else 1)
        say(
            f"(b) {name}: raw {median(r['raw']):.0f} MB/s, read() {median(r['all']):.0f} MB/s, random batches "
            f"{median(r['random']):.0f} MB/s"
        )
    # Error of each codec against the exact (codec none) activations, on the first rows.
    exact_entry = entries["losa none"]
    rows_cmp = np.arange(min(exact_entry.meta["shape"][0], args.error_rows))
    exact = exact_entry.read(rows_cmp).astype(np.float32)
    norm = float(np.sqrt(np.mean(exact**2)))
    for name, entry in entries.items():
        diff = entry.read(rows_cmp).astype(np.float32) - exact
        rows[name]["rel_rms_error"] = float(np.sqrt(np.mean(diff**2))) / norm
        rows[name]["max_abs_error"] = float(np.abs(diff).max())
    return rows


def report(args: argparse.Namespace, b: dict[str, Any]) -> None:
    print(
        "(b) cache reads, warm page cache for both (entries just written; files read once untimed first; nothing "
        "dropped): MB/s of decoded float16 activations for CacheEntry.read(), of file bytes for the raw read; "
        f"random = {args.read_batches} mini-batches of {args.read_batch} random rows, all layers; amplification = "
        "bytes read from files / bytes returned"
    )
    headers = ["entry", "files", "MB on disk", "raw read MB/s", "read() all MB/s", "read() vs raw", "zarr [:] MB/s"]
    headers += ["random MB/s", "amplification", "chunk rows", "rel RMS err", "max abs err"]
    rows = []
    for name, r in b.items():
        rows.append(
            [
                name,
                str(r["files"]),
                fmt(r["disk_bytes"] / MB, 1),
                spread(r["raw"], 0),
                spread(r["all"], 0),
                fmt(ratio(median(r["all"]), median(r["raw"])), 3),
                spread(r["slice"], 0),
                spread(r["random"], 0),
                fmt(median(r["amplification"]), 1),
                str(r["chunk_rows"]),
                f"{r['rel_rms_error']:.2e}",
                f"{r['max_abs_error']:.2e}",
            ]
        )
    print(render(headers, rows))
    print(
        "'zarr [:]' = the same array read by zarr directly with one basic slice (a reference for CacheEntry.read's "
        f"own overhead); errors: against the codec-none activations over the first {args.error_rows} images "
        "(lossless codecs: 0)"
    )
