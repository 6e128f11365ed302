"""bench/cache.py, part (a): extraction against its ceiling. Each stage is measured alone, then the whole extraction:

- decode: the production loader (services/data/loading.py) decoding and resizing every image, no model;
- forward: the bare forward (`Backbone.intermediates` of the cached layers, float16 out) on batches already normalised
  in device memory;
- writer: the cache writer (storage/cache/writer.py) writing those activations into a fresh entry, against the raw
  sequential write bandwidth of the same disk (files of the shard's size, each fsync'd, as tensorstore fsyncs);
- whole: `run_extraction`'s own images/s.

Ceiling: on a GPU box the stages use different resources (the loader the CPU cores, the forward the GPU, the writer
the disk), so the slowest stage; on a CPU they share the cores, so `1 / sum(1 / stage)`, with each stage measured on
the whole machine (decode on one loader process per core). `pipeline_efficiency` = whole / ceiling.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

from common import MB, fmt, make_settings, median, put, ratio, render, say, spread, sync

# (row, dataset, method, codec, keepbits): every extraction row. The first of each dataset gets the stage rows.
EXTRACT_ROWS = [
    ("photos losa none", "photos", "losa", "none", None),
    ("losa none", "digits", "losa", "none", None),
    ("losa zstd", "digits", "losa", "zstd", None),
    ("losa blosc", "digits", "losa", "blosc", None),
    ("losa zstd+keepbits6", "digits", "losa", "zstd", 6),
    ("linear none", "digits", "linear", "none", None),
]
DATASETS = ("photos", "digits")


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
                "precision": args.precision,
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
                "seed": kw.get("seed", 0),
                "compile": kw.get("compile", False),
            },
        }
    )


def settings_for(args: argparse.Namespace, name: str, train_memory_mb: int | None = None):
    """Settings whose data dir (cache, checkpoints) is private to `name`: `prepare` reuses any complete entry of the
    same family that covers a job, so each extraction row needs a cache of its own to really extract."""
    s = make_settings(args.work / "runs" / name.replace(" ", "-"), args.work, args.device, train_memory_mb)
    return s.model_copy(update={"loader_workers": args.loader_workers, "cache_writers": args.cache_writers})


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_rate(dataset, split, batch_size: int, workers: int) -> float:
    from services.data.loading import BatchReader, iterate

    n = len(dataset)
    batches = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
    iterate_all = iterate(BatchReader(dataset.paths, batches, split.pil, False), workers)
    t0 = time.perf_counter()
    count = sum(len(b.valid) for b in iterate_all)
    return count / (time.perf_counter() - t0)


def forward_rate(backbone, ready: list, layers: list[int], device: str) -> float:
    import torch

    sync(device)
    t0 = time.perf_counter()
    for x in ready:
        backbone.intermediates(x, layers, torch.float16)
    sync(device)
    return sum(len(x) for x in ready) / (time.perf_counter() - t0)


WRITER_SHARDS = 48  # shards written by the writer stage and files by the disk probe


def writer_rate(args: argparse.Namespace, acts: list, codec: str, keepbits: int | None, tag: str) -> tuple[float, int]:
    """(images/s, bytes written) of ShardWriter writing `acts` (one host array per extraction batch) into a fresh
    entry with `codec`."""
    import numpy as np

    from storage.cache import FeatureCache
    from storage.cache.writer import ShardWriter

    root = args.work / "writer" / tag
    shutil.rmtree(root, ignore_errors=True)
    entry = FeatureCache(root).entry("stage/writer")
    n = sum(len(a) for a in acts)
    _, layers, tokens, dim = acts[0].shape
    entry.create(
        labels=np.zeros(n, np.int64),
        layers=list(range(layers)),
        tokens="all",
        token_count=tokens,
        dim=dim,
        batch_size=len(acts[0]),
        meta={"num_prefix_tokens": 1},
        codec=codec,
        keepbits=keepbits,
    )
    t0 = time.perf_counter()
    with ShardWriter(entry, args.cache_writers) as writer:
        for b, a in enumerate(acts):
            writer.submit(b, a, np.ones(len(a), bool))
    seconds = time.perf_counter() - t0
    written = entry.nbytes()
    shutil.rmtree(root, ignore_errors=True)
    return n / seconds, written


def disk_mb_s(directory: Path, file_bytes: int, files: int) -> float:
    """Raw sequential write bandwidth: `files` files of `file_bytes` (random bytes), each fsync'd, one after another."""
    import numpy as np

    data = np.random.default_rng(0).integers(0, 256, file_bytes, dtype=np.uint8).tobytes()
    d = directory / "disk-probe"
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i in range(files):
        with open(d / f"{i}", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    shutil.rmtree(d, ignore_errors=True)
    return files * file_bytes / MB / seconds


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Stages and whole extractions for every dataset and row, `--repeats` interleaved rounds."""
    import numpy as np
    import torch

    from services.backbones import load_backbone
    from services.data.datasets import read_dataset
    from services.data.loading import BatchReader, iterate, loader_workers
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter
    from services.spec import BackboneSpec

    device, bs = args.device, args.batch_size
    gpu = device.startswith("cuda")
    spec = BackboneSpec(name=args.backbone, pretrained=False, image_size=args.image_size, precision=args.precision)
    backbone = load_backbone(spec, device)
    all_layers = list(range(backbone.num_layers))
    prod_workers = loader_workers(settings_for(args, "probe"), 10**6)
    stage_workers = args.stage_loaders
    if stage_workers is None:
        stage_workers = prod_workers if gpu else max(prod_workers, cores())
    data: dict[str, Any] = {}
    for name in DATASETS:
        dataset = read_dataset(args.datasets[name])
        n = len(dataset)
        batches = [list(range(s, min(n, s + bs))) for s in range(0, n, bs)]
        ready = [
            backbone.input(b.images) for b in iterate(BatchReader(dataset.paths, batches, backbone.split.pil, False), 0)
        ]
        for x in ready[:2]:  # warm-up: kernels, allocator, thread pools
            backbone.intermediates(x, all_layers, torch.float16)
        acts = [backbone.intermediates(x, all_layers, torch.float16).cpu().numpy() for x in ready]
        data[name] = {"dataset": dataset, "ready": ready, "acts": acts, "n": n}
    decode_rate(data["digits"]["dataset"], backbone.split, bs, stage_workers)  # starts the forkserver, untimed

    stages: dict[str, dict[str, list[float]]] = {
        name: {"decode": [], "forward": [], "writer": [], "disk": []} for name in DATASETS
    }
    writer_bytes: dict[str, int] = {}
    ext: dict[str, list[dict[str, Any]]] = {row: [] for row, *_ in EXTRACT_ROWS}
    for rep in range(args.repeats):
        say(f"(a) extraction, round {rep + 1}/{args.repeats}")
        for name in DATASETS:
            d, st = data[name], stages[name]
            st["decode"].append(decode_rate(d["dataset"], backbone.split, bs, stage_workers))
            st["forward"].append(forward_rate(backbone, d["ready"], all_layers, device))
            # sustained rates: at least WRITER_SHARDS shards each (the dataset's batches over again), so opening the
            # arrays and the last fsync are not most of what is timed
            full = [a for a in d["acts"] if len(a) == len(d["acts"][0])]  # a short last batch only at the end
            shards = max(WRITER_SHARDS, len(d["acts"]))
            rate, written = writer_rate(args, [full[i % len(full)] for i in range(shards)], "none", None, name)
            st["writer"].append(rate)
            writer_bytes[name] = written // shards * len(d["acts"])
            st["disk"].append(disk_mb_s(args.work, d["acts"][0].nbytes, shards))
            say(
                f"  {name}: decode {st['decode'][-1]:.1f} img/s ({stage_workers} loaders), forward "
                f"{st['forward'][-1]:.1f} img/s, writer {rate:.1f} img/s, disk {st['disk'][-1]:.0f} MB/s"
            )
        for row, name, method, codec, keepbits in EXTRACT_ROWS:
            shutil.rmtree(args.work / "runs" / row.replace(" ", "-"), ignore_errors=True)  # no cache hit
            spec = job_spec(args, method, codec=codec, keepbits=keepbits, dataset=args.datasets[name])
            res = run_extraction(spec, settings_for(args, row), NullReporter())
            assert not res["cache_hit"], res
            ext[row].append(res)
            say(
                f"  extract {row}: {res['extract_images_per_s']} img/s ({res['loader_workers']} loader processes, "
                f"{res['writer']}), {res['bytes_per_image'] / 1024:.1f} KiB/image"
            )
    info = {
        "num_layers": backbone.num_layers,
        "tokens": backbone.tokens,
        "dim": backbone.dim,
        "images": data["digits"]["n"],
        "photos": data["photos"]["n"],
        "params": sum(p.numel() for p in backbone.model.parameters()),
        "precision": backbone.precision,
        "prod_workers": prod_workers,
        "stage_workers": stage_workers,
        "cores": cores(),
        "bytes_per_image_raw": int(np.prod(data["digits"]["acts"][0].shape[1:])) * 2,
    }
    bf16 = bf16_error(args, backbone, data["digits"]["ready"][0], all_layers)
    return {"stages": stages, "ext": ext, "info": info, "writer_bytes": writer_bytes, "bf16_rel_error": bf16}


def bf16_error(args: argparse.Namespace, backbone, x, layers: list[int]) -> float:
    """Relative error (Frobenius) of the bf16 forward's activations against the fp32 forward, on one batch."""
    import torch

    from services.backbones import load_backbone

    other = "fp32" if backbone.precision == "bf16" else "bf16"
    twin = load_backbone(backbone.spec, args.device, precision=other)
    a = backbone.intermediates(x, layers, torch.float32).float()
    b = twin.intermediates(x, layers, torch.float32).float()
    ref, low = (a, b) if backbone.precision == "fp32" else (b, a)
    return ((low - ref).norm() / ref.norm()).item()


def report(args: argparse.Namespace, a: dict[str, Any]) -> dict[str, Any]:
    """Prints part (a); returns its headline figures and `key=value` pairs ("kv")."""
    info, stages, ext = a["info"], a["stages"], a["ext"]
    gpu = args.device.startswith("cuda")
    kv: dict[str, str] = {}
    print(
        "(a) extraction against its ceiling: each stage alone, then run_extraction's own img/s (first decode to "
        f"last write). decode: the loader with {info['stage_workers']} processes ({info['cores']} cores; "
        f"extraction itself uses {info['prod_workers']} loader processes, {'' if info['prod_workers'] else 'i.e. a '}"
        f"{'' if info['prod_workers'] else 'loader thread, '}by `auto`); forward: Backbone.intermediates of all "
        f"{info['num_layers']} blocks on batches already normalised in device memory ({info['precision']}); writer: "
        f"ShardWriter ({args.cache_writers} shards in flight) of those activations, codec none; ceiling = "
        f"{'the slowest stage (GPU box: separate resources)' if gpu else '1 / sum(1 / stage) (CPU: shared cores)'}"
    )
    headers = ["dataset", "decode img/s", "forward img/s", "writer img/s", "ceiling", "extract img/s", "efficiency"]
    headers += ["vs forward"]
    rows, out = [], {}
    for name in DATASETS:
        st = stages[name]
        dec, fwd, wri = median(st["decode"]), median(st["forward"]), median(st["writer"])
        ceiling = min(dec, fwd, wri) if gpu else 1 / (1 / dec + 1 / fwd + 1 / wri)
        row = "photos losa none" if name == "photos" else "losa none"
        whole = median([r["extract_images_per_s"] for r in ext[row]])
        eff = ratio(whole, ceiling)
        out[name] = {"efficiency": eff, "extract_ratio": ratio(whole, fwd), "whole": whole}
        rows.append(
            [
                name,
                spread(st["decode"]),
                spread(st["forward"]),
                spread(st["writer"]),
                fmt(ceiling, 1),
                spread([r["extract_images_per_s"] for r in ext[row]]),
                fmt(eff, 3),
                fmt(ratio(whole, fwd), 3),
            ]
        )
        put(kv, f"decode_img_s_{name}", dec, 1)
        put(kv, f"forward_img_s_{name}", fwd, 1)
        put(kv, f"writer_img_s_{name}", wri, 1)
        put(kv, f"extract_img_s_{name}", whole, 1)
    print(render(headers, rows))

    shard_mb = info["bytes_per_image_raw"] * args.batch_size / MB
    writer_mb_s = median(stages["digits"]["writer"]) * info["bytes_per_image_raw"] / MB
    disk = median(stages["digits"]["disk"])
    writer_vs_disk = ratio(writer_mb_s, disk)
    print(
        f"writer: {writer_mb_s:,.0f} MB/s of activations ({shard_mb:.1f} MB shards, fsync'd by tensorstore) against "
        f"the disk's raw sequential writes of the same file size, each fsync'd: {disk:,.0f} MB/s "
        f"({spread(stages['digits']['disk'], 0)}); writer_vs_disk {fmt(writer_vs_disk, 3)}"
    )
    print(
        f"bf16 forward against fp32, relative error of the activations (all layers, one batch): "
        f"{a['bf16_rel_error']:.2e}"
    )

    headers = ["row", "img/s", "vs forward (ready)", "bytes/image", "vs raw fp16", "loaders", "writer"]
    rows = []
    for row, name, method, *_ in EXTRACT_ROWS:
        runs = ext[row]
        rate = median([r["extract_images_per_s"] for r in runs])
        bpi = runs[-1]["bytes_per_image"]
        full = info["dim"] * 2 * (1 if method == "linear" else info["num_layers"] * info["tokens"])
        rows.append(
            [
                f"extract {row}",
                spread([r["extract_images_per_s"] for r in runs]),
                fmt(ratio(rate, median(stages[name]["forward"])), 2) if method == "losa" else "-",
                f"{bpi:,}",
                fmt(bpi / full, 3),
                str(runs[-1]["loader_workers"]),
                runs[-1]["writer"],
            ]
        )
        slug = row.replace(" ", "_").replace("+", "_")
        put(kv, f"bytes_per_image_{slug}", float(bpi), 0)
    print(render(headers, rows))
    put(kv, "disk_write_mb_s", disk, 0)
    put(kv, "writer_mb_s", writer_mb_s, 0)
    put(kv, "bf16_rel_error", a["bf16_rel_error"], 5)
    return {
        "pipeline_efficiency_photos": out["photos"]["efficiency"],
        "pipeline_efficiency_digits": out["digits"]["efficiency"],
        "extract_ratio": out["digits"]["extract_ratio"],
        "extract_ratio_photos": out["photos"]["extract_ratio"],
        "writer_vs_disk": writer_vs_disk,
        "kv": kv,
    }
