"""Feature-cache benchmark: what the cache costs at extraction, what reading it gives, and what it buys in training.

    .venv/bin/python bench/cache.py                     # CPU: vit_tiny_patch16_224 at 112 px on 256 digits
    .venv/bin/python bench/cache.py --device cuda       # GPU: vit_base_patch16_224 at 224 px on all 1,797 digits
    .venv/bin/python bench/cache.py --no-memory         # skip the vit_base batch-size-1 memory figure

(a) Extraction (bench/cache_extract.py): `run_extraction` (backbone forward + fp16 + cache writes, its own
    `extract_images_per_s`) against the bare forward (`Backbone.intermediates`, no pooling, no fp16 copy, no writes)
    of the same model, batch and precision, fed by the same loader (`services.extraction._load_batch`, one batch
    ahead in a thread) so both pay the same decoding; the bare forward on batches decoded beforehand is shown too.
    Rows per codec (none, zstd, blosc, zstd + BitRound keepbits=6) for LoSA (all layers, all tokens), and a
    linear-probe row (one pooled token).
(b) Reading (bench/cache_reads.py): `CacheEntry.read()` of everything and of random mini-batches (all layers)
    against `open().read()` of the entry's files. Both warm: the entry was just written and the raw files are read
    once, untimed, first.
(c) Training (bench/cache_training.py): LoSA (all layers) images/s in mode `cache` against mode `online` (the
    backbone under no_grad on every step, the paper's way), same hyperparameters and epochs, from `train_job`'s
    `train_images_per_s` (the training loop only; validation and setup excluded). Then the peak training memory at
    batch size 1 (the paper's convention) with vit_base_patch16_224 at 224 px, each mode in its own subprocess.
(d) Codec accuracy (bench/cache_codecs.py): LoSA trained from each codec's entry of (a), validation accuracy against
    codec none's.

Timed rows are repeated `--repeats` times, interleaved, and the median is reported (the values are listed too).
The last line of the output is `key=value` pairs for scripts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cache_codecs
import cache_extract
import cache_reads
import cache_training
import common
from common import fmt, median

TARGETS = {"extract_ratio": 0.9, "train_speedup": 10.0, "train_mem_ratio": 0.25}  # DESIGN.md, "Targets"


def print_header(args: argparse.Namespace, info: dict) -> None:
    print(
        f"sidetune cache benchmark: {args.backbone} at {args.image_size} px ({info['num_layers']} blocks, "
        f"{info['tokens']} tokens, D {info['dim']}, {info['params']:,} params, RANDOM INIT), device {args.device}"
    )
    print(common.machine_line(args.load_start))
    print(
        f"data: {info['images']} scikit-learn digits (32x32 PNG); extraction batch {args.batch_size}, precision "
        "fp32 (as run_extraction runs the backbone: no autocast), activations stored as float16; "
        f"{args.repeats} interleaved rounds per timed row, median shown with every round's value"
    )


def report(args: argparse.Namespace, a: dict, b: dict, c: dict, d: dict, mem: dict | None) -> None:
    """Prints the three parts, the targets' verdicts and the `key=value` line."""
    info = a["info"]
    print_header(args, info)
    print()
    extraction = cache_extract.report(args, a)
    print()
    cache_reads.report(args, b)
    print()
    extract_seconds = a["ext"]["losa none"][-1]["extract_seconds"]
    train_speedup = cache_training.report_speed(args, c, info, extract_seconds)
    print()
    codec_kv = cache_codecs.report(args, d, a)
    mem_kv: dict[str, str] = {}
    ratios = {"train_mem_ratio": None, "train_mem_ratio_inmem": None}
    if mem is not None:
        print()
        ratios = cache_training.report_memory(args, mem, mem_kv)
    extract_ratio, train_mem_ratio = extraction["extract_ratio"], ratios["train_mem_ratio"]

    print()
    met = {
        "extract_ratio": extract_ratio is not None and extract_ratio >= TARGETS["extract_ratio"],
        "train_speedup": train_speedup is not None and train_speedup >= TARGETS["train_speedup"],
        "train_mem_ratio": train_mem_ratio is not None and train_mem_ratio <= TARGETS["train_mem_ratio"],
    }
    verdict = {k: "met" if v else "MISSED" for k, v in met.items()}
    if mem is None:
        verdict["train_mem_ratio"] = "not measured"
    print(
        f"targets (DESIGN.md): extract_ratio {fmt(extract_ratio, 3)} >= 0.9: {verdict['extract_ratio']}; "
        f"train_speedup {fmt(train_speedup, 1)} >= 10: {verdict['train_speedup']}; "
        f"train_mem_ratio {fmt(train_mem_ratio, 3)} <= 0.25: {verdict['train_mem_ratio']}"
    )
    none, bare = b["losa none"], a["bare"]
    kv: dict[str, str] = {}
    for key, value, digits in [
        ("extract_ratio", extract_ratio, 3),
        ("train_speedup", train_speedup, 2),
        ("train_mem_ratio", train_mem_ratio, 3),
        ("read_mb_s", median(none["all"]), 0),
        ("raw_read_mb_s", median(none["raw"]), 0),
        ("random_read_mb_s", median(none["random"]), 0),
        ("read_amplification", median(none["amplification"]), 2),
        ("zarr_slice_read_mb_s", median(none["slice"]), 0),
        ("extract_ratio_predecoded", extraction["extract_ratio_decoded"], 3),
        ("extract_img_s", extraction["extract_img_s"], 1),
        ("bare_img_s", median(bare["loader_all"]), 1),
        ("bare_predecoded_img_s", median(bare["decoded"]), 1),
        ("extract_write_mb_s", extraction["write_mb_s"], 1),
        ("disk_write_mb_s", a["disk_write_mb_s"], 0),
        ("cache_img_s", median(c["cache"]["img_s"]), 1),
        ("cache_streamed_img_s", median(c["cache (streamed)"]["img_s"]), 1),
        ("online_img_s", median(c["online"]["img_s"]), 1),
        ("train_mem_ratio_inmem", ratios["train_mem_ratio_inmem"], 3),
    ]:
        common.put(kv, key, value, digits)
    kv |= extraction["kv"] | codec_kv | mem_kv
    kv |= {
        "targets_met": ",".join(k for k, v in met.items() if v) or "none",
        "targets_missed": ",".join(k for k, v in met.items() if not v) or "none",
        "backbone": args.backbone,
        "image_size": str(args.image_size),
        "mem_backbone": args.mem_backbone if mem is not None else "none",
        "memory": ("cuda" if args.device.startswith("cuda") else "rss") if mem is not None else "none",
        "batch_size": str(args.batch_size),
        "images": str(info["images"]),
        "repeats": str(args.repeats),
        "device": args.device,
        "wall_s": f"{time.perf_counter() - args.t_start:.0f}",
    }
    common.print_kv(kv)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, cpu_limit=256)
    p.add_argument("--batch-size", type=int, help="extraction and training batch (default: 32 on CPU, 64 on CUDA)")
    p.add_argument("--epochs", type=int, default=2, help="LoSA training epochs, both modes")
    p.add_argument("--rank", type=int, default=8, help="LoSA rank")
    p.add_argument("--codec-epochs", type=int, default=10, help="LoSA epochs per codec entry in part (d)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every timed row (median)")
    p.add_argument("--read-batch", type=int, default=64, help="rows per random mini-batch read")
    p.add_argument("--read-batches", type=int, default=5, help="random mini-batches read per round")
    p.add_argument("--error-rows", type=int, default=256, help="images compared for the codecs' errors")
    p.add_argument("--disk-probe-mb", type=int, default=128, help="size of the disk write-bandwidth probe")
    p.add_argument("--no-memory", action="store_true", help="skip the batch-size-1 memory figure")
    p.add_argument("--mem-backbone", default="vit_base_patch16_224", help="backbone of the memory figure")
    p.add_argument("--mem-image-size", type=int, default=224)
    p.add_argument("--mem-images", type=int, default=40, help="digits written for the memory figure (10%% held out)")
    p.add_argument("--mem-repeats", type=int, default=2, help="rounds of the memory children (median)")
    p.add_argument("--malloc-default", action="store_true", help="keep glibc's heap caching in the memory children")
    p.add_argument("--mem-child", choices=["cache", "online"], help=argparse.SUPPRESS)
    p.add_argument("--mem-cache-key", help=argparse.SUPPRESS)
    p.add_argument("--mem-train-memory-mb", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu = common.resolve_defaults(args, cpu_limit=256)
    args.batch_size = args.batch_size or (64 if gpu else 32)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.mem_child:
        args.work = Path(args.work)
        args.dataset = args.mem_dataset = common.digits_dir(args.work, "digits-mem")
        common.child_result(cache_training.mem_child(args))
        return 0
    args.t_start, args.load_start = time.perf_counter(), common.load_average()
    with common.workdir(args.data_dir, "sidetune-bench-cache-") as work:
        args.work = work
        args.dataset = common.digits_dir(work)
        args.mem_dataset = common.digits_dir(work, "digits-mem")
        counts = common.write_digits(work, args.limit)
        common.say(f"data in {work}: {counts['train']} digits ({counts['holdout']} held out, unused)")
        a = cache_extract.measure(args)
        b = cache_reads.measure(args, a)
        c = cache_training.measure_speed(args, a)
        d = cache_codecs.measure(args, a)
        mem = None if args.no_memory else cache_training.measure_memory(args, __file__)
        report(args, a, b, c, d, mem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
