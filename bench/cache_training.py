"""bench/cache.py, part (c): LoSA training images/s from the cache against `online` (the backbone on every step), and
the peak training memory of each mode at batch size 1 (the LoSA paper's convention), each mode in its own process.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import common
from cache_extract import job_spec, settings_for
from common import MB, MEMORY_ENV, fmt, median, put, ratio, render, say, spread

from services.jobs.progress import NullReporter

SPEED_RUNS = ["cache", "cache (streamed)", "online (ready batches)"]
MEM_RUNS = [  # (name, mode, train_memory_mb): the first cache row is the headline
    ("cache (streamed)", "cache", 0),
    ("cache (in memory)", "cache", 4096),
    ("online", "online", None),
]


def checkpoint(args: argparse.Namespace, name: str):
    return args.work / "checkpoints" / name.replace(" ", "-").replace("(", "").replace(")", "")


class ReadyOnline:
    """LoSA's `online` input fed fairly: images decoded, resized and normalised beforehand, held in device memory,
    so each step is the frozen backbone's no_grad forward and nothing else (no decoding, no copies). A Source for
    services.training.fit.fit."""

    def __init__(self, backbone, images, labels, layers: list[int]) -> None:
        import torch

        self.backbone, self.layers = backbone, layers
        self.x = backbone.input(images)  # [N, 3, H, W] on the device, in the forward's dtype
        self.y = torch.as_tensor(labels).to(backbone.device)

    def iterate(self, batches):
        import torch

        for b in batches:
            idx = torch.from_numpy(b).to(self.backbone.device)
            yield self.backbone.intermediates(self.x[idx], self.layers), self.y[idx]


def fit_online_ready(backbone, spec, inputs, labels, classes: int, ckpt: Path) -> dict[str, Any]:
    """LoSA online from ready inputs (decoded images or clips, held in device memory): the model train_job builds for
    mode online, split as the job splits, trained by the same `fit`. Returns fit's timings and the val accuracy."""
    import torch

    from services import methods
    from services.data.splits import stratified_split
    from services.methods.readout import FeatureInfo
    from services.training.fit import fit
    from services.training.objectives import Objective
    from services.training.runs import ModuleRuns

    device = str(backbone.device)
    train_idx, val_idx = stratified_split(labels, spec.dataset.val_fraction, spec.dataset.split_seed)
    hp = spec.training.resolved(spec.method.training_defaults())
    torch.manual_seed(hp.seed)
    info = FeatureInfo.from_meta(backbone.info(), backbone.readout_tensors(), classes)
    model = methods.build(spec.method, info).to(device)
    train = ReadyOnline(backbone, inputs[train_idx], labels[train_idx], model.input_layers)
    val = ReadyOnline(backbone, inputs[val_idx], labels[val_idx], model.input_layers)
    objective = Objective(labels[train_idx], classes, device=device)
    shutil.rmtree(ckpt, ignore_errors=True)
    results, timing = fit(
        [ModuleRuns(model, hp, objective, device)],
        [(0, 0)],
        train,
        val,
        len(train_idx),
        len(val_idx),
        hp,
        objective,
        NullReporter(),
        ckpt,
    )
    shutil.rmtree(ckpt, ignore_errors=True)
    return {**timing, "val_accuracy": results[0].score}  # fit's figures are timings; a job adds the scores


def train_online_ready(args: argparse.Namespace, spec) -> dict[str, Any]:
    """LoSA online from ready batches of the digits (decoded and resized beforehand)."""
    import numpy as np
    import torch

    from services.backbones import load_backbone
    from services.data.datasets import read_dataset
    from services.data.loading import BatchReader, iterate

    backbone = load_backbone(spec.backbone, args.device)
    dataset = read_dataset(args.dataset)
    batches = [np.arange(s, min(len(dataset), s + 64)) for s in range(0, len(dataset), 64)]
    images = torch.cat([b.images for b in iterate(BatchReader(dataset.paths, batches, backbone.split.pil, False), 0)])
    return fit_online_ready(
        backbone, spec, images, dataset.labels, len(dataset.classes), checkpoint(args, "online ready")
    )


def steady_img_s(reporter: NullReporter, images: int) -> float | None:
    """Training images/s over the epochs after the first (which holds a compilation, when there is one)."""
    seconds = [e["data"]["train_seconds"] for e in reporter.events if e["type"] == "metrics" and "epoch" in e["data"]][
        1:
    ]
    return images * len(seconds) / sum(seconds) if seconds else None


def measure_speed(args: argparse.Namespace, extraction: dict[str, Any]) -> dict[str, Any]:
    """`--repeats` interleaved rounds of LoSA training from the digits' codec-none entry of part (a), in memory and
    streamed, and online from ready batches; then, with `--compile`, the in-memory row with torch.compile."""
    key = extraction["ext"]["losa none"][-1]["cache_key"]
    cache_spec = job_spec(args, "losa", "cache")
    runs = {
        "cache": (cache_spec, settings_for(args, "losa none", args.train_memory_mb), key),
        "cache (streamed)": (cache_spec, settings_for(args, "losa none", 0), key),
    }
    out: dict[str, Any] = {name: {"img_s": [], "metrics": None, "inputs": ""} for name in SPEED_RUNS}
    for rep in range(args.repeats):
        for name, (spec, settings, cache_key) in runs.items():
            result, inputs = common.train_fresh(spec, settings, cache_key, checkpoint(args, name))
            m = result["metrics"]
            out[name]["img_s"].append(m["train_images_per_s"])
            out[name]["metrics"], out[name]["inputs"] = m, inputs
            say(f"(c) round {rep + 1}/{args.repeats} losa/{name}: {m['train_images_per_s']} img/s")
        m = train_online_ready(args, job_spec(args, "losa", "online"))
        name = "online (ready batches)"
        out[name]["img_s"].append(m["train_images_per_s"])
        out[name]["metrics"], out[name]["inputs"] = m, "images in device memory, backbone forward every step"
        say(f"(c) round {rep + 1}/{args.repeats} losa/{name}: {m['train_images_per_s']} img/s")
    if args.compile:
        out["compile"] = {}
        for compiled in (False, True):
            spec = job_spec(args, "losa", "cache", compile=compiled, epochs=max(3, args.epochs))
            reporter = NullReporter()
            result, _ = common.train_fresh(
                spec, runs["cache"][1], key, checkpoint(args, f"compile {compiled}"), reporter
            )
            m = result["metrics"]
            out["compile"][compiled] = {
                "steady": steady_img_s(reporter, m["train_images"]),
                "first_step_s": m["first_step_seconds"],
                "val": m["val_accuracy"],
            }
            say(f"(c) compile={compiled}: {out['compile'][compiled]}")
    out["hp"] = cache_spec.training.resolved(cache_spec.method.training_defaults()).model_dump()
    return out


def report_speed(args: argparse.Namespace, c: dict[str, Any], info: dict, extract_seconds: float) -> float | None:
    """Prints the speed table; returns train_speedup (cache in memory against online from ready batches)."""
    hp = c["hp"]
    print(
        f"(c) LoSA training (rank {args.rank}, all {info['num_layers']} layers), {args.epochs} epochs, batch "
        f"{args.batch_size}, {hp['optimizer']} lr {hp['lr']} wd {hp['weight_decay']} warmup {hp['warmup_epochs']} "
        "(the paper's settings), same model, loop (services.training.fit.fit) and hyperparameters for every row; "
        "img/s = fit's train_images_per_s (training loop only; validation and setup excluded). The baseline is online "
        "LoSA fed fairly: images decoded beforehand and held in device memory, so it pays the backbone forward only"
    )
    headers = ["mode", "inputs", "train img/s", "vs online", "train s", "val acc (random init)"]
    online = median(c["online (ready batches)"]["img_s"])
    rows = []
    for name in SPEED_RUNS:
        r, m = c[name], c[name]["metrics"]
        vs_online = fmt(ratio(median(r["img_s"]), online), 1)
        accuracy = fmt(m["val_accuracy"], 3)
        rows.append([f"losa {name}", r["inputs"], spread(r["img_s"]), vs_online, fmt(m["train_seconds"], 2), accuracy])
    print(render(headers, rows, left=2))
    print(
        "one-off extraction that the cache rows rely on (not in their img/s): "
        f"{extract_seconds:.1f} s for {info['images']} images"
    )
    if "compile" in c:
        plain, compiled = c["compile"][False], c["compile"][True]
        print(
            f"torch.compile (training.compile) of the side network, cache in memory, img/s over the epochs after the "
            f"first: {fmt(plain['steady'], 1)} without, {fmt(compiled['steady'], 1)} with "
            f"(x{fmt(ratio(compiled['steady'], plain['steady']), 2)}); first step {plain['first_step_s']:.2f} s "
            f"without, {compiled['first_step_s']:.1f} s with (the compilation); val acc {plain['val']:.4f} / "
            f"{compiled['val']:.4f}"
        )
    return ratio(median(c["cache"]["img_s"]), online)


class MarkingReporter(NullReporter):
    """A NullReporter that calls `on_training` when train_job announces training (setup done, fit about to start)."""

    def __init__(self, on_training: Any) -> None:
        super().__init__()
        self.on_training = on_training

    def event(self, message: str, *args: Any, **kwargs: Any) -> None:
        if message.startswith("training ") and "inputs: " in message:
            self.on_training()
        super().event(message, *args, **kwargs)


def mem_child(args: argparse.Namespace) -> dict[str, Any]:
    """One mode's peak memory at batch size 1 (`--mem-child MODE`), in its own process, above the baseline taken
    after every import, in three windows: setup (train_job until it announces training: backbone or cache features
    loaded, model built), training (from there to the first validation: the steps of epoch 1, with what setup left
    still resident; the headline), and the whole job (validation runs at batch 64). RSS on the CPU; on CUDA also
    torch.cuda.max_memory_allocated, which fit resets after setup (resident tensors count)."""
    import gc

    import PIL.PngImagePlugin  # noqa: F401  (decoding plugins: imported by both modes before the baseline)
    import timm  # noqa: F401
    import torch
    import zarr  # noqa: F401

    import services.methods.losa.model  # noqa: F401
    import services.training.fit as loop

    cuda = args.device.startswith("cuda")
    settings = settings_for(args, "mem", args.mem_train_memory_mb)
    spec = job_spec(
        args,
        "losa",
        args.mem_child,
        dataset=args.mem_dataset,
        backbone=args.mem_backbone,
        image_size=args.mem_image_size,
        epochs=1,
        train_batch=1,
    )
    gc.collect()
    sampler = common.PeakRSS().start()
    peaks: dict[str, int] = {}
    cuda_peak: list[int] = []

    def on_training() -> None:
        peaks["setup"] = sampler.mark()

    evaluate = loop.evaluate

    def evaluate_after_training(*a: Any, **kw: Any) -> list[tuple[float, float]]:
        if "train" not in peaks:  # the first validation: the training steps of epoch 1 are done
            peaks["train"] = sampler.mark()
            if cuda:
                cuda_peak.append(torch.cuda.max_memory_allocated())
        return evaluate(*a, **kw)

    # fit (services/training/fit.py) validates through its module's `evaluate`, looked up at call time; no event
    # marks the end of an epoch's steps before validation starts
    loop.evaluate = evaluate_after_training
    ckpt = args.work / "checkpoints" / f"mem-{args.mem_child}-{args.mem_train_memory_mb}"
    reporter = MarkingReporter(on_training)
    try:
        out, inputs = common.train_fresh(spec, settings, args.mem_cache_key, ckpt, reporter)
    finally:
        loop.evaluate = evaluate
    peaks["validation"] = sampler.mark()
    sampler.stop()
    m = out["metrics"]
    above = {k: (peak - sampler.baseline) / MB for k, peak in peaks.items()}
    result = {
        "baseline_mb": sampler.baseline / MB,
        "setup_rss_mb": above["setup"],
        "train_rss_mb": above["train"],
        "exact": sampler.exact,
        "job_rss_mb": max(above.values()),
        "steps": m["train_images"],
        "img_s": m["train_images_per_s"],
        "inputs": inputs,
    }
    if cuda:
        result["cuda_train_mb"] = cuda_peak[0] / MB
        result["cuda_job_mb"] = m.get("peak_memory_mb")
    return result


def measure_memory(args: argparse.Namespace, script: str) -> dict[str, Any]:
    """Extracts the memory figure's digits with `--mem-backbone`, then runs `script --mem-child MODE` for each of
    MEM_RUNS, `--mem-repeats` rounds."""
    from services.extraction import run_extraction

    counts = common.write_digits(args.work, args.mem_images, "digits-mem")
    spec = job_spec(args, "losa", dataset=args.mem_dataset, backbone=args.mem_backbone, image_size=args.mem_image_size)
    say(f"(c) memory: extracting {counts['train']} digits with {args.mem_backbone} at {args.mem_image_size} px")
    shutil.rmtree(args.work / "runs" / "mem", ignore_errors=True)  # a fresh extraction (with --data-dir reused)
    res = run_extraction(spec, settings_for(args, "mem"), NullReporter())
    out: dict[str, Any] = {"extraction": res, "children": {}}
    env = {} if args.malloc_default else MEMORY_ENV
    base = ["--work", str(args.work)] + common.flags(args, ["device", "rank", "mem_backbone", "mem_image_size"])
    base += ["--batch-size", str(args.batch_size)]
    for rep in range(args.mem_repeats):
        for name, mode, train_mb in MEM_RUNS:
            argv = ["--mem-child", mode, *base]
            if mode == "cache":
                argv += ["--mem-cache-key", res["cache_key"], "--mem-train-memory-mb", str(train_mb)]
            t0 = time.perf_counter()
            r = common.run_child(script, argv, env)
            out["children"].setdefault(name, []).append(r)
            if "error" in r:
                say(f"(c) memory {name} FAILED:\n  " + "\n  ".join(r["log"]))
                continue
            say(
                f"(c) memory round {rep + 1}/{args.mem_repeats} {name}: {r['train_rss_mb']:.1f} MB above baseline in "
                f"training, {r['job_rss_mb']:.1f} MB in the whole job ({time.perf_counter() - t0:.0f} s)"
            )
    return out


def report_memory(args: argparse.Namespace, mem: dict[str, Any], kv: dict[str, str]) -> dict[str, float | None]:
    """Prints the memory table; returns train_mem_ratio (streamed cache against online) and the in-memory ratio."""
    cuda = args.device.startswith("cuda")
    children, me = mem["children"], mem["extraction"]
    metric = "cuda_train_mb" if cuda else "train_rss_mb"
    print(
        f"(c) peak training memory at batch size 1: LoSA rank {args.rank}, all layers, {args.mem_backbone} at "
        f"{args.mem_image_size} px (random init), {me['images']} digits ({me['extract_images_per_s']} img/s to "
        f"extract, {me['bytes'] / MB:.0f} MB cached), 1 epoch, each mode in its own process"
    )
    if cuda:
        print(
            "memory: torch.cuda.max_memory_allocated, reset by fit after setup (resident weights count) and read "
            "at the first validation; RSS columns for information"
        )
    else:
        heap = (
            "glibc default allocator"
            if args.malloc_default
            else "glibc heap caching off (MALLOC_MMAP_THRESHOLD_=131072), so RSS follows live memory"
        )
        print(
            "memory: peak RSS above the child's baseline taken after every import (exact: the kernel's VmHWM, "
            "reset through /proc/self/clear_refs at the start of each window); 'train' = from train_job's "
            "announcing training (setup done, what it loaded still resident) to the first validation: the "
            "steps of epoch 1 at batch 1 (the headline); 'setup' = train_job's start to that point; 'job' = all "
            f"of train_job, validation (batch 64) included; {heap}; {args.mem_repeats} rounds"
        )
    print(
        "includes: online = backbone weights (fp32) + its no_grad forward at batch 1 + image decoding + side "
        "network, grads, optimizer; cache (streamed, Settings.train_memory_mb=0, the headline) = side network, "
        "grads, optimizer + one prefetched batch read from the cache per step + zarr's reader; cache (in "
        "memory) = the same + the train and val features in RAM (train_job's default under 4 GB). "
        "'img/s @ bs 1' is slowed by the mmap threshold (large allocations fault their pages in): not a speed "
        "figure"
    )
    headers = ["mode", "inputs", "train peak MB", "vs online", "setup peak MB", "job peak MB", "baseline MB"]
    headers += ["exact", "steps", "img/s @ bs 1"]
    if cuda:
        headers[2], headers[7] = "train CUDA MB", "train RSS MB"
    ok = {name: [r for r in children.get(name, []) if "error" not in r] for name, _, _ in MEM_RUNS}
    med = {name: (median([r[metric] for r in runs]) if runs else None) for name, runs in ok.items()}
    rows = []
    for name, _, _ in MEM_RUNS:
        runs = ok[name]
        if not runs:
            rows.append([f"losa {name}", "failed"] + ["-"] * (len(headers) - 2))
            continue
        rows.append(
            [
                f"losa {name}",
                runs[-1]["inputs"],
                spread([r[metric] for r in runs]),
                fmt(ratio(med[name], med["online"]), 3),
                spread([r["setup_rss_mb"] for r in runs]),
                spread([r["cuda_job_mb"] if cuda else r["job_rss_mb"] for r in runs]),
                fmt(median([r["baseline_mb"] for r in runs]), 0),
                spread([r["train_rss_mb"] for r in runs]) if cuda else str(runs[-1]["exact"]).lower(),
                str(runs[-1]["steps"]),
                spread([r["img_s"] for r in runs], 2),
            ]
        )
    print(render(headers, rows, left=2))
    put(kv, "cache_mem_mb", med["cache (streamed)"], 1)
    put(kv, "cache_inmem_mem_mb", med["cache (in memory)"], 1)
    put(kv, "online_mem_mb", med["online"], 1)
    return {
        "train_mem_ratio": ratio(med["cache (streamed)"], med["online"]),
        "train_mem_ratio_inmem": ratio(med["cache (in memory)"], med["online"]),
    }
