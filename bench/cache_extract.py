"""bench/cache.py, part (a): extraction images/s with cache writing against the bare backbone forward fed by the same
loader, per codec, and the disk's write bandwidth; plus the job specs and settings that every part of it uses.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import MB, fmt, make_settings, median, put, ratio, render, say, spread, sync

# (row name, method, codec, keepbits): every extraction row. The first is the headline (the default codec).
EXTRACT_ROWS = [
    ("losa none", "losa", "none", None),
    ("losa zstd", "losa", "zstd", None),
    ("losa blosc", "losa", "blosc", None),
    ("losa zstd+keepbits6", "losa", "zstd", 6),
    ("linear none", "linear", "none", None),
]


def job_spec(args: argparse.Namespace, method: str, mode: str = "cache", **kw: Any):
    """A JobSpec for `method` on the digits at `kw['dataset']` (default: the main set); random init."""
    from services.spec import JobSpec

    method_cfg: dict[str, Any] = {"name": method}
    if method == "losa":
        method_cfg |= {"rank": args.rank, "layers": "all"}
    return JobSpec.model_validate(
        {
            "name": f"bench-cache-{method}-{mode}",
            "dataset": {"path": str(kw.get("dataset", args.dataset))},
            "backbone": {
                "name": kw.get("backbone", args.backbone),
                "pretrained": False,
                "image_size": kw.get("image_size", args.image_size),
            },
            "method": method_cfg,
            "execution": {"mode": mode},
            "extraction": {
                "batch_size": kw.get("batch_size", args.batch_size),
                "codec": kw.get("codec", "none"),
                "keepbits": kw.get("keepbits"),
            },
            "training": {
                "epochs": kw.get("epochs", args.epochs),
                "batch_size": kw.get("train_batch", args.batch_size),
                "seed": 0,
            },
        }
    )


def settings_for(args: argparse.Namespace, name: str, train_memory_mb: int | None = None):
    """Settings whose data dir (cache, checkpoints) is private to `name`: `prepare` reuses any complete entry of the
    same family that covers a job, so each extraction row needs a cache of its own to really extract."""
    return make_settings(args.work / "runs" / name.replace(" ", "-"), args.work, args.device, train_memory_mb)


def bare_forward(backbone, dataset, layers: list[int], batch_size: int, device: str, decoded=None) -> float:
    """Images/s of `Backbone.intermediates` over the dataset in extraction batches: with `decoded` (a list of ready
    batches) the forward alone; without, images decoded by extraction's own loader one batch ahead in a thread, as
    `run_extraction` does. No pooling, no fp16 copy, no cache writes."""
    from services.extraction import _as_input, _load_batch

    n = len(dataset)
    ranges = [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    sync(device)
    t0 = time.perf_counter()
    if decoded is not None:
        for x in decoded:
            backbone.intermediates(x, layers)
    else:
        with ThreadPoolExecutor(1) as loader:
            pending = loader.submit(_load_batch, dataset, backbone.transform, *ranges[0], False)
            for k in range(len(ranges)):
                images, _, _ = pending.result()
                if k + 1 < len(ranges):
                    pending = loader.submit(_load_batch, dataset, backbone.transform, *ranges[k + 1], False)
                backbone.intermediates(_as_input(backbone.transform, images), layers)
    sync(device)
    return n / (time.perf_counter() - t0)


def disk_write_mb_s(directory: Path, size_mb: int) -> float:
    """Sequential write bandwidth of the data dir's disk: `size_mb` in 4 MiB blocks, fsync included."""
    import numpy as np

    block = np.random.default_rng(0).integers(0, 256, 4 * MB, dtype=np.uint8).tobytes()
    path = directory / "disk-write-probe.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, size_mb // 4)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return max(1, size_mb // 4) * 4 / seconds


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every extraction row and the bare forwards, `--repeats` interleaved rounds."""
    import torch

    from services.backbones import load_backbone
    from services.datasets import read_dataset
    from services.extraction import _as_input, _load_batch, run_extraction
    from services.progress import NullReporter
    from services.spec import BackboneSpec

    device = args.device
    dataset = read_dataset(args.dataset)
    backbone = load_backbone(BackboneSpec(name=args.backbone, pretrained=False, image_size=args.image_size), device)
    all_layers, last = list(range(backbone.num_layers)), [backbone.num_layers - 1]
    n, bs = len(dataset), args.batch_size
    loaded = [_load_batch(dataset, backbone.transform, s, min(n, s + bs), False)[0] for s in range(0, n, bs)]
    decoded = [_as_input(backbone.transform, x) for x in loaded]
    for x in decoded[:2]:  # warm-up: kernels, allocator, thread pools
        backbone.intermediates(x, all_layers)
    sync(device)

    bare: dict[str, list[float]] = {"decoded": [], "loader_all": [], "loader_last": []}
    ext: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in EXTRACT_ROWS}

    def extract(name: str, method: str, codec: str, keepbits: int | None) -> None:
        shutil.rmtree(args.work / "runs" / name.replace(" ", "-"), ignore_errors=True)  # no cache hit
        spec = job_spec(args, method, codec=codec, keepbits=keepbits)
        t0 = time.perf_counter()
        res = run_extraction(spec, settings_for(args, name), NullReporter())
        assert not res["cache_hit"], res
        res["call_seconds"] = time.perf_counter() - t0
        ext[name].append(res)
        say(f"  {name}: {res['extract_images_per_s']} img/s, {res['bytes_per_image'] / 1024:.1f} KiB/image")

    def bare_row(key: str, layers: list[int], label: str, ready=None) -> None:
        bare[key].append(bare_forward(backbone, dataset, layers, bs, device, ready))
        say(f"  bare forward, {label}: {bare[key][-1]:.1f} img/s")

    for rep in range(args.repeats):
        say(f"(a) extraction, round {rep + 1}/{args.repeats}")
        bare_row("decoded", all_layers, "decoded beforehand", decoded)
        bare_row("loader_all", all_layers, "same loader")
        for name, method, codec, keepbits in EXTRACT_ROWS:
            if method == "linear":
                bare_row("loader_last", last, "same loader, last layer")
            extract(name, method, codec, keepbits)
    info = {
        "num_layers": backbone.num_layers,
        "tokens": backbone.tokens,
        "dim": backbone.dim,
        "images": n,
        "params": sum(p.numel() for p in backbone.model.parameters()),
    }
    decoded = backbone = None  # freed before the disk probe
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    disk = disk_write_mb_s(args.work, args.disk_probe_mb)
    return {"bare": bare, "ext": ext, "info": info, "disk_write_mb_s": disk}


def report(args: argparse.Namespace, a: dict[str, Any]) -> dict[str, Any]:
    """Prints part (a); returns its headline figures and its per-row `key=value` pairs ("kv")."""
    info, bare, ext = a["info"], a["bare"], a["ext"]
    kv: dict[str, str] = {}
    print(
        "(a) extraction images/s: run_extraction's extract_images_per_s (timed from the first batch's decode to the "
        "last write, excluding backbone creation, weight hashing and the dataset scan) against the bare forward "
        "(Backbone.intermediates of the same layers) fed by the same loader (extraction's _load_batch one batch "
        "ahead in a thread); ratios use the medians"
    )
    headers = ["row", "img/s", "vs bare (same loader)", "vs bare (decoded beforehand)", "bytes/image"]
    headers += ["vs raw fp16", "write MB/s", "whole call s"]
    loader_vs_decoded = fmt(ratio(median(bare["loader_all"]), median(bare["decoded"])), 2)
    rows = [
        ["bare forward, decoded beforehand", spread(bare["decoded"]), "-", "1.00"] + ["-"] * 4,
        ["bare forward, same loader", spread(bare["loader_all"]), "1.00", loader_vs_decoded] + ["-"] * 4,
        ["bare forward, same loader, last layer", spread(bare["loader_last"])] + ["-"] * 6,
    ]
    for name, method, *_ in EXTRACT_ROWS:
        runs = ext[name]
        rate = median([r["extract_images_per_s"] for r in runs])
        denom = median(bare["loader_last"] if method == "linear" else bare["loader_all"])
        bpi = runs[-1]["bytes_per_image"]
        full = info["dim"] * 2 * (1 if method == "linear" else info["num_layers"] * info["tokens"])
        r_loader = ratio(rate, denom)
        r_decoded = ratio(rate, median(bare["decoded"])) if method == "losa" else None
        rows.append(
            [
                f"extract {name}",
                spread([r["extract_images_per_s"] for r in runs]),
                fmt(r_loader, 2),
                fmt(r_decoded, 2),
                f"{bpi:,}",
                fmt(bpi / full, 3),
                fmt(rate * bpi / MB, 1),
                spread([r["call_seconds"] for r in runs], 2),
            ]
        )
        slug = name.replace(" ", "_").replace("+", "_")
        put(kv, f"extract_ratio_{slug}", r_loader)
        put(kv, f"bytes_per_image_{slug}", float(bpi), 0)
    print(render(headers, rows))
    if median(bare["decoded"]) < median(bare["loader_all"]):
        print(
            "note: the forward on batches decoded beforehand is slower than the loader-fed one here. With no second "
            "busy thread in the process, libgomp's spinning OpenMP workers lose the shared CPUs to other processes "
            "(with OMP_WAIT_POLICY=PASSIVE both run at the same speed); the ratios use the loader-fed forward, which "
            "has the same threads as run_extraction"
        )
    head = ext["losa none"]
    extract_img_s = median([r["extract_images_per_s"] for r in head])
    write_mb_s = extract_img_s * head[-1]["bytes_per_image"] / MB
    stored_rows = -(-info["images"] // args.batch_size) * args.batch_size
    raw_fp16 = info["num_layers"] * info["tokens"] * info["dim"] * 2
    disk = a["disk_write_mb_s"]
    print(
        f"bytes/image = all of the entry's files / images, including the fill of the last, partial shard "
        f"({stored_rows} rows stored for {info['images']} images: x{stored_rows / info['images']:.3f}), "
        "metadata included"
    )
    print(
        f"raw fp16 per image (all layers, all tokens): {raw_fp16:,} bytes; disk write bandwidth of the data dir: "
        f"{disk:.0f} MB/s ({args.disk_probe_mb} MB, 4 MiB blocks, fsync); extraction (losa none) writes "
        f"{write_mb_s:.1f} MB/s, {100 * write_mb_s / disk:.1f}% of it, so the disk "
        f"{'binds' if write_mb_s > 0.9 * disk else 'does not bind'}"
    )
    return {
        "extract_ratio": ratio(extract_img_s, median(bare["loader_all"])),
        "extract_ratio_decoded": ratio(extract_img_s, median(bare["decoded"])),
        "extract_img_s": extract_img_s,
        "write_mb_s": write_mb_s,
        "kv": kv,
    }
