"""Every method side by side on one backbone and one dataset, like the LoSA paper's Table 7: trainable parameters,
peak training memory, training images/s, inference images/s and validation accuracy, with ratios against full
fine-tuning measured in the same run.

    .venv/bin/python bench/methods.py                      # CPU: vit_tiny_patch16_224 at 112 px on 600 digits
    .venv/bin/python bench/methods.py --device cuda        # GPU: vit_base_patch16_224 at 224 px

Each row (method, execution mode) trains in its own subprocess (bench/methods_row.py), so that its peak memory is
its own; on CPU a second, 1-epoch subprocess per row measures the peak memory with glibc's heap caching off
(`--memory rss` skips it). The feature cache that the `cache` and `tail` rows read is extracted once, in this
process, before them, and timed on its own line. The last line of the output is `key=value` pairs for scripts.
Without `--pretrained` the backbone is randomly initialised and `--hp short` replaces the papers' learning rates
(see methods_row.SHORT); both are printed in the header.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import common
from common import MEMORY_ENV, fmt, put, ratio, say
from methods_row import SHORT_TEXT, TAIL_BLOCKS, bare_backbone, make_spec, run_one, settings

# (method, mode): every method in each of its execution modes but `online` for linear (LoSA's online row is the
# paper's way of training, the baseline the cache is measured against).
ROWS = [
    ("linear", "cache"),
    ("losa", "cache"),
    ("losa", "online"),
    ("apla", "images"),
    ("arc", "images"),
    ("lora", "images"),
    ("full", "images"),
    ("apla", "tail"),
    ("arc", "tail"),
    ("lora", "tail"),
]
DEFAULT_MODE = {
    "linear": "cache",
    "losa": "cache",
    "apla": "images",
    "arc": "images",
    "lora": "images",
    "full": "images",
}
# the parent's arguments that each row's process gets
CHILD_FLAGS = "backbone image_size epochs batch_size limit device data_dir hp infer_batch infer_batches warmup"
CHILD_FLAGS += " train_memory_mb pretrained"
HEADERS = [
    "method",
    "mode",
    "inputs",
    "side params",
    "classifier",
    "peak MB",  # named after the memory measure
    "RSS MB (timed run)",
    "train img/s",
    "one-off extraction s",
    "infer img/s",
    "val acc",
    "speed vs full",
    "memory vs full",
    "hp (opt lr wd warmup)",
]


def row_name(method: str, mode: str) -> str:
    return f"{method}/{mode}"


def key_suffix(method: str, mode: str) -> str:
    return method if DEFAULT_MODE[method] == mode else f"{method}_{mode}"


def short_inputs(inputs: str) -> str:
    """train_job's description of a row's inputs, shortened for the table."""
    if "cached" in inputs:
        return "cache (GPU)" if "GPU" in inputs else "cache (RAM)" if "in memory" in inputs else "cache (disk)"
    if "backbone forward every step" in inputs:
        return "images>backbone"
    return "images" if inputs else "-"


def extract(args: argparse.Namespace) -> dict[str, Any]:
    """The feature cache of every cache and tail row, extracted once: LoSA reads every layer's tokens."""
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter
    from storage.cache import FeatureCache

    config = settings(args)
    t0 = time.perf_counter()
    extraction = run_extraction(make_spec(args, "losa", "cache"), config, NullReporter())
    meta = FeatureCache(config.cache_dir).entry(extraction["cache_key"]).meta
    extraction["layers"] = len(meta.get("layers", range(meta["shape"][1])))
    extraction["tokens"] = meta.get("token_mode", "all")
    hit = "cache hit" if extraction["cache_hit"] else "extracted"
    say(f"extraction: {extraction['images']} images in {time.perf_counter() - t0:.1f} s ({hit})")
    return extraction


def run_rows(args: argparse.Namespace, rows: list[tuple[str, str]], extraction: dict | None) -> dict[str, dict]:
    """Each row in its own process (then its memory pass, when `args.live_memory`); `peak_mb` is the row's memory
    figure: CUDA peak, live RSS or timed-run RSS."""
    results: dict[str, dict[str, Any]] = {}
    for k, (method, mode) in enumerate(rows):
        name = row_name(method, mode)
        argv = ["--one", name, *common.flags(args, CHILD_FLAGS.split())]
        if extraction and mode in ("cache", "tail"):
            argv += ["--cache-key", extraction["cache_key"]]
        t0 = time.perf_counter()
        r = results[name] = common.run_child(__file__, argv)
        if "error" in r:
            say(f"[{k + 1}/{len(rows)}] {name} FAILED ({r['error']}):\n  " + "\n  ".join(r["log"]))
            continue
        if args.live_memory:
            mem = common.run_child(__file__, [*argv, "--memory-pass"], MEMORY_ENV)
            r["live_mb"] = mem.get("rss_mb")
            if "error" in mem:
                say(f"{name}: memory pass FAILED ({mem['error']}):\n  " + "\n  ".join(mem["log"]))
        r["peak_mb"] = r.get("cuda_peak_mb") if args.cuda else r.get("live_mb") if args.live_memory else r["rss_mb"]
        say(
            f"[{k + 1}/{len(rows)}] {name}: {time.perf_counter() - t0:.0f} s, val acc {r['val_accuracy']:.3f}, "
            f"train {r['train_images_per_s']} img/s, peak {r['peak_mb']} MB"
        )
    return results


def table(rows: list[tuple[str, str]], results: dict[str, dict], extraction: dict | None, mem_col: str) -> str:
    full = results.get("full/images", {})
    lines = []
    for method, mode in rows:
        r = results[row_name(method, mode)]
        if "error" in r:
            lines.append([method, mode, "failed"] + ["-"] * (len(HEADERS) - 3))
            continue
        hp = r["hyperparameters"]
        cached = extraction and mode in ("cache", "tail")
        lines.append(
            [
                method,
                mode,
                short_inputs(r.get("inputs", "")),
                f"{r['side_params']:,}",
                f"{r['classifier_params']:,}",
                fmt(r["peak_mb"]),
                fmt(r["rss_mb"]),
                fmt(r["train_images_per_s"]),
                fmt(extraction["extract_seconds"], 1) if cached else "-",
                fmt(r["infer_images_per_s"]),
                fmt(r["val_accuracy"], 3),
                fmt(ratio(r["train_images_per_s"], full.get("train_images_per_s")), 2),
                fmt(ratio(r["peak_mb"], full.get("peak_mb")), 3),
                f"{hp['optimizer']} {hp['lr']:g} {hp['weight_decay']:g} {hp['warmup_epochs']:g}",
            ]
        )
    return common.render([mem_col if h == "peak MB" else h for h in HEADERS], lines, left=2)


def print_header(args: argparse.Namespace, counts: dict, ref: dict, extraction: dict | None) -> None:
    init = "pretrained weights" if args.pretrained else "RANDOM INIT (pretrained=False): accuracies say little"
    print(
        f"sidetune methods benchmark: {args.backbone} at {args.image_size} px ({ref['num_layers']} blocks, "
        f"{ref['tokens']} tokens, D {ref['dim']}, {ref['backbone_params']:,} backbone params), {init}"
    )
    print(
        f"data: scikit-learn digits, {counts['train']} images split 80/20 train/val (stratified), "
        f"{counts['holdout']} held out for inference; {args.epochs} epochs, batch {args.batch_size}; device "
        f"{args.device}"
    )
    if args.hp == "short":
        print(f"hyperparameters: OVERRIDDEN (--hp short): {SHORT_TEXT}")
    else:
        print("hyperparameters: every method's own paper defaults (--hp paper)")
    if args.cuda:
        print(
            "memory: torch.cuda.max_memory_allocated during training, reset after the model and its inputs were "
            "set up: resident weights count, and so do cached features when they were moved onto the GPU ('inputs' "
            "column: cache (GPU); cache (RAM) rows keep them in host memory, see 'RSS MB')"
        )
    else:
        print(
            "memory: peak RSS above the process's baseline after imports during train_job (setup, training, "
            "validation; the kernel's VmHWM, reset when train_job starts), including the data the method needs: "
            "cached features for cache/tail modes, the backbone for the others. "
            + (
                "'peak live' comes from a separate 1-epoch run with MALLOC_MMAP_THRESHOLD_=131072, so that freed "
                "tensors leave the RSS; 'RSS (timed run)' includes what glibc keeps cached"
                if args.live_memory
                else "It includes what the allocator keeps cached"
            )
        )
    print(
        "inputs: cache (RAM/GPU/disk) = cached activations held in host memory, on the GPU, or read from the cache "
        "per batch; images = forward and backward through the backbone; images>backbone = frozen forward on every "
        "step, no backprop into it"
    )
    print(
        "train img/s: training steps only (no validation, no setup); cache/tail rows exclude the one-off "
        f"extraction, shown in its own column; tail rows adapt the last {TAIL_BLOCKS} blocks from cached "
        "activations; losa/online runs the frozen backbone on every step (the LoSA paper's way)"
    )
    print(
        f"infer img/s: Predictor.predict on batches of {args.infer_batch} PNG bytes (decode, transform, backbone, "
        f"head; adapted methods merged into a plain ViT, fp32), median of {args.infer_batches} calls after "
        f"{args.warmup} warm-up calls"
    )
    if extraction:
        print(
            f"extraction (once, shared by the cache and tail rows): {extraction['images']} images in "
            f"{extraction['extract_seconds']} s ({extraction.get('extract_images_per_s', '-')} img/s forward + "
            f"write{', cache hit' if extraction['cache_hit'] else ''}), "
            f"{extraction.get('bytes', 0) / 2**20:.0f} MB cached ({extraction.get('layers', 'all')} layers, "
            f"{extraction.get('tokens', 'all')} tokens)"
        )
    print(common.machine_line(args.load_start))
    print(
        f"reference, bare backbone (fp32, no head, batch {args.infer_batch}): forward "
        f"{ref['forward_images_per_s']} img/s on ready tensors, {ref['png_forward_images_per_s']} img/s from PNG "
        "bytes (decode + transform + forward)"
    )


def final_line(args: argparse.Namespace, rows: list, results: dict, ref: dict, extraction: dict | None) -> bool:
    """Prints the `key=value` line; returns whether a row failed."""

    def get(name: str, key: str) -> float | None:
        return results.get(name, {}).get(key)

    kv = {
        "backbone": args.backbone,
        "image_size": str(args.image_size),
        "device": args.device,
        "pretrained": str(args.pretrained).lower(),
        "epochs": str(args.epochs),
        "batch_size": str(args.batch_size),
        "hp": args.hp,
        "memory": "cuda" if args.cuda else "live" if args.live_memory else "rss",
    }
    speed, mem, png = "train_images_per_s", "peak_mb", ref["png_forward_images_per_s"]
    put(kv, "losa_vs_full_speed", ratio(get("losa/cache", speed), get("full/images", speed)))
    put(kv, "losa_vs_full_mem", ratio(get("losa/cache", mem), get("full/images", mem)))
    put(kv, "losa_online_vs_cache_speed", ratio(get("losa/online", speed), get("losa/cache", speed)))
    put(kv, "losa_cache_vs_online_speed", ratio(get("losa/cache", speed), get("losa/online", speed)))
    put(kv, "losa_cache_vs_online_mem", ratio(get("losa/cache", mem), get("losa/online", mem)))
    put(kv, "losa_infer_vs_backbone", ratio(get("losa/cache", "infer_images_per_s"), png))
    put(kv, "full_infer_vs_backbone", ratio(get("full/images", "infer_images_per_s"), png))
    put(kv, "extract_s", extraction["extract_seconds"] if extraction else None, 2)
    put(kv, "backbone_img_s", ref["forward_images_per_s"], 1)
    for prefix, key, digits in (("acc", "val_accuracy", 3), ("img_s", speed, 1), ("mem_mb", mem, 1)):
        for method, mode in rows:
            put(kv, f"{prefix}_{key_suffix(method, mode)}", get(row_name(method, mode), key), digits)
    acc_losa, acc_linear = get("losa/cache", "val_accuracy"), get("linear/cache", "val_accuracy")
    kv["losa_beats_linear"] = "nan" if acc_losa is None or acc_linear is None else str(acc_losa > acc_linear).lower()
    failed = [n for n, r in results.items() if "error" in r]
    kv["failed"] = ",".join(failed) if failed else "none"
    kv["wall_s"] = f"{time.perf_counter() - args.t_start:.0f}"
    common.print_kv(kv)
    return bool(failed)


def run_all(args: argparse.Namespace) -> int:
    rows = [r for r in ROWS if row_name(*r) in args.methods] if args.methods else list(ROWS)
    counts = common.write_digits(args.data_dir, args.limit)
    say(f"data in {args.data_dir}: {counts['train']} digits to train and validate on, {counts['holdout']} held out")
    ref = bare_backbone(args)
    say(f"bare backbone forward: {ref['forward_images_per_s']} img/s")
    extraction = extract(args) if any(mode in ("cache", "tail") for _, mode in rows) else None
    results = run_rows(args, rows, extraction)

    mem_col = "peak CUDA MB" if args.cuda else "peak live MB" if args.live_memory else "peak RSS MB"
    print_header(args, counts, ref, extraction)
    print()
    print(table(rows, results, extraction, mem_col))
    print()
    return 1 if final_line(args, rows, results, ref, extraction) else 0


# --smoke: timm's 6-block test ViT at 32 px on 40 digits for one epoch, one timed predict call, and a row for each
# execution mode (each row is a process, whose imports alone take seconds) with the timed run's RSS (no memory pass)
SMOKE = {
    "methods": ["losa/cache", "losa/online", "full/images", "lora/tail"],
    "memory": "rss",
    "backbone": "test_vit",
    "image_size": 32,
    "limit": 40,
    "epochs": 1,
    "batch_size": 8,
    "infer_batch": 8,
    "infer_batches": 1,
    "warmup": 1,
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, cpu_limit=600)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (and extraction batch)")
    names = " ".join(row_name(*r) for r in ROWS)
    p.add_argument("--methods", nargs="+", metavar="METHOD/MODE", help=f"rows (default all): {names}")
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="timm's pretrained weights (needs the internet or the Hugging Face cache); default: random init",
    )
    p.add_argument(
        "--hp",
        choices=["auto", "paper", "short"],
        default="auto",
        help="`paper`: every method's own defaults; `short`: explicit lrs for a few epochs on random init (see "
        "methods_row.SHORT); `auto`: paper with --pretrained, else short",
    )
    p.add_argument(
        "--memory",
        choices=["live", "rss"],
        default="live",
        help="CPU peak memory: `live` adds a 1-epoch run per row with glibc's heap caching off (RSS follows live "
        "tensors); `rss`: the timed run's RSS only (faster). CUDA always reports max_memory_allocated",
    )
    p.add_argument("--infer-batch", type=int, default=32, help="images per predict call")
    p.add_argument("--infer-batches", type=int, default=7, help="timed predict calls (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before them")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--memory-pass", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-key", help=argparse.SUPPRESS)
    args = common.parse_with_smoke(p, argv, SMOKE)
    unknown = sorted(set(args.methods or []) - set(names.split()))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {names}")
    args.cuda = common.resolve_defaults(args, cpu_limit=600)
    if args.hp == "auto":
        args.hp = "paper" if args.pretrained else "short"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.one:
        common.child_result(run_one(args))
        return 0
    args.t_start, args.load_start = time.perf_counter(), common.load_average()
    args.live_memory = args.memory == "live" and not args.cuda and common.glibc()
    with common.workdir(args.data_dir, "sidetune-bench-") as work:
        args.data_dir = work
        return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
