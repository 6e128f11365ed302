"""Video benchmark: extracting clips into the cache against the bare ViViT forward, the cache's bytes per clip, and
LoSA trained from the cache against LoSA online fed from ready clips.

    .venv/bin/python bench/video.py                  # CPU: vit_tiny_patch16_224 at 64 px, 8 frames, 128 videos
    .venv/bin/python bench/video.py --device cuda    # GPU: vit_base_patch16_224 at 224 px, 16 frames, 512 videos
    .venv/bin/python bench/video.py --smoke          # seconds: tiny data (tests/bench/)

Data: the synthetic motion videos (services/video/synthetic.py; H.264 in .mp4, 16 frames each at the frame size).
(a) Extraction: each stage alone, as `run_extraction` runs it: decoding clips (ClipReader on the loader processes
    the extraction would use), the bare ViViT forward on ready clips already in device memory, and the cache writer
    writing the forward's activations; then `run_extraction` itself. `extract_vs_forward` = whole / bare forward
    (what extraction costs beyond the model); `pipeline_efficiency` = whole / ceiling, the ceiling being the
    slowest stage where the stages use different resources (a GPU), 1 / sum(1 / stage) where they share the CPU.
(b) Bytes per clip: the complete entry's bytes / clips, against L x (T' S + 1) x D x 2; and ViViT-B/16 at 16 frames
    (all 12 layers: 28.9 MB) and Kinetics-400 (240k clips) for scale.
(c) Training: LoSA (all layers) clips/s from the cache against LoSA online fed from ready clips (decoded
    beforehand, in device memory: each step pays the ViViT's no_grad forward and nothing else), same model, loop
    and hyperparameters: `train_speedup`.

The last line of the output is `key=value` pairs for scripts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import common
from cache_extract import forward_rate, writer_rate
from cache_training import fit_online_ready
from common import fmt, put, ratio, render, say

KINETICS_CLIPS = 240_000


def loaders(workers: int) -> str:
    return f"{workers} loader processes" if workers else "a loader thread"


def job_spec(args: argparse.Namespace, mode: str, method: str = "losa"):
    from services.spec import JobSpec

    return JobSpec.model_validate(
        {
            "dataset": {"path": str(args.dataset)},
            "backbone": {
                "name": args.backbone,
                "pretrained": False,
                "image_size": args.image_size,
                "video": {"num_frames": args.frames, "tubelet": args.tubelet},
            },
            "method": {"name": method, "rank": args.rank} if method == "losa" else {"name": method},
            "execution": {"mode": mode},
            "extraction": {"batch_size": args.batch_size},
            "training": {"epochs": args.epochs, "batch_size": args.train_batch_size},
        }
    )


def measure_extraction(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from services.data.loading import iterate, loader_workers
    from services.extraction import prepare, run_extraction
    from services.jobs.progress import NullReporter
    from services.video.loading import clip_reader, clip_transform

    spec = job_spec(args, "cache")
    settings = common.make_settings(args.work / "data", args.work, args.device)
    prep = prepare(spec, settings)
    backbone, dataset, layers = prep.backbone, prep.dataset, prep.layers
    n, bs = len(dataset), prep.batch_size
    batches = [np.arange(s, min(n, s + bs)) for s in range(0, n, bs)]
    workers = loader_workers(settings, n)
    transform = clip_transform(backbone.data_config, backbone.split.pil)
    t0 = time.perf_counter()
    clips = [b.images for b in iterate(clip_reader(dataset, batches, transform, False, spec.backbone.video), workers)]
    decode = n / (time.perf_counter() - t0)
    say(f"(a) decode: {decode:.1f} clips/s ({loaders(workers)})")
    ready = [backbone.input(c) for c in clips]  # in device memory, normalised
    forward_rate(backbone, ready[:1], layers, args.device)  # warm-up
    forward = forward_rate(backbone, ready, layers, args.device)
    say(f"(a) bare forward: {forward:.1f} clips/s")
    with torch.inference_mode():
        acts = [backbone.intermediates(x, layers, torch.float16).cpu().numpy() for x in ready]
    writer, written = writer_rate(
        SimpleNamespace(work=args.work, cache_writers=settings.cache_writers), acts, "none", None, "video"
    )
    say(f"(a) writer: {writer:.1f} clips/s")
    del ready, acts, clips
    result = run_extraction(spec, settings, NullReporter())
    whole = n / result["extract_seconds"]
    say(f"(a) run_extraction: {whole:.1f} clips/s")
    stages = {"decode": decode, "forward": forward, "writer": writer}
    gpu = args.device.startswith("cuda")
    ceiling = min(stages.values()) if gpu else 1 / sum(1 / r for r in stages.values())
    info = backbone.info()
    return {
        "stages": stages,
        "whole": whole,
        "ceiling": ceiling,
        "result": result,
        "workers": workers,
        "batch_size": bs,
        "layers": layers,
        "info": info,
        "written": written,
        "n": n,
        "params": sum(p.numel() for p in backbone.model.parameters()),
        "precision": backbone.precision,
    }


def train_online_ready(args: argparse.Namespace, spec) -> dict[str, Any]:
    """LoSA online from ready clips (decoded and sampled beforehand)."""
    import numpy as np
    import torch

    from services.backbones import load_backbone
    from services.data.datasets import read_dataset
    from services.data.loading import iterate
    from services.video.loading import clip_reader, clip_transform

    backbone = load_backbone(spec.backbone, args.device)
    dataset = read_dataset(args.dataset)
    batches = [np.arange(s, min(len(dataset), s + 16)) for s in range(0, len(dataset), 16)]
    reader = clip_reader(
        dataset, batches, clip_transform(backbone.data_config, backbone.split.pil), False, spec.backbone.video
    )
    clips = torch.cat([b.images for b in iterate(reader, 0)])
    ckpt = args.work / "checkpoints" / "online-ready"
    return fit_online_ready(backbone, spec, clips, dataset.labels, len(dataset.classes), ckpt)


def measure_training(args: argparse.Namespace, cache_key: str) -> dict[str, Any]:
    settings = common.make_settings(args.work / "data", args.work, args.device)
    cache, inputs = common.train_fresh(job_spec(args, "cache"), settings, cache_key, args.work / "checkpoints" / "c")
    say(f"(c) cache: {cache['metrics']['train_images_per_s']} clips/s ({inputs})")
    online = train_online_ready(args, job_spec(args, "online"))
    say(f"(c) online from ready clips: {online['train_images_per_s']} clips/s")
    return {"cache": cache["metrics"], "online": online, "inputs": inputs}


def report(args: argparse.Namespace, a: dict[str, Any], c: dict[str, Any], load_start: float) -> None:
    from services.architectures import architecture
    from services.jobs.plan_text import human_bytes
    from services.video.spec import VideoSpec

    info, kv = a["info"], {}
    print(
        f"sidetune video benchmark: {args.backbone} at {args.image_size} px as a ViViT of {args.frames} frames, "
        f"tubelet {args.tubelet} ({info['num_layers']} blocks, {info['tokens']} tokens, D {info['dim']}, "
        f"{a['params']:,} params, RANDOM INIT), device {args.device}, forward in {a['precision']}"
    )
    print(common.machine_line(load_start))
    print(
        f"data: {a['n']} synthetic motion videos (H.264, 16 frames of {args.size} px); extraction batch "
        f"{a['batch_size']} clips, {len(a['layers'])} layers, activations stored as float16"
    )
    print()
    s = a["stages"]
    rows = [
        ["decode (ClipReader, PyAV)", f"{s['decode']:,.1f}", loaders(a["workers"])],
        ["bare ViViT forward (ready clips)", f"{s['forward']:,.1f}", "clips already in device memory"],
        ["cache writer", f"{s['writer']:,.1f}", f"{human_bytes(a['written'])} written"],
        [
            "ceiling",
            f"{a['ceiling']:,.1f}",
            "slowest stage" if args.device.startswith("cuda") else "1 / sum(1 / stage): the stages share the CPU",
        ],
        ["run_extraction (whole)", f"{a['whole']:,.1f}", f"{a['result']['extract_seconds']:.1f} s"],
    ]
    print("(a) extraction, clips/s")
    print(render(["stage", "clips/s", "note"], rows, left=1))
    extract_vs_forward, efficiency = ratio(a["whole"], s["forward"]), ratio(a["whole"], a["ceiling"])
    print(f"extract_vs_forward = {fmt(extract_vs_forward, 3)}; pipeline_efficiency = {fmt(efficiency, 3)}")
    if efficiency is not None and efficiency > 1:
        print(
            "(above 1: the stages did not take turns on the CPU as the ceiling assumes; decoding overlapped the "
            "forward on a core the forward left idle)"
        )
    print()
    per_clip = a["result"]["bytes"] / a["n"]
    formula = len(a["layers"]) * info["tokens"] * info["dim"] * 2
    vb = architecture("vit_base_patch16_224", None, VideoSpec(num_frames=16))
    vivit_b = vb.num_layers * vb.tokens * vb.dim * 2
    print("(b) bytes per clip")
    print(
        render(
            ["cache", "per clip", "formula L x (T'S+1) x D x 2", "Kinetics-400 (240k clips)"],
            [
                [
                    f"this run ({len(a['layers'])} layers)",
                    human_bytes(per_clip),
                    human_bytes(formula),
                    human_bytes(per_clip * KINETICS_CLIPS),
                ],
                [
                    "ViViT-B/16, 16 frames, all 12 layers",
                    "-",
                    human_bytes(vivit_b),
                    human_bytes(vivit_b * KINETICS_CLIPS),
                ],
            ],
        )
    )
    print()
    cm, om = c["cache"], c["online"]
    speedup = ratio(cm["train_images_per_s"], om["train_images_per_s"])
    print(f"(c) LoSA training (rank {args.rank}, {args.epochs} epochs, batch {args.train_batch_size})")
    print(
        render(
            ["inputs", "clips/s", "val acc"],
            [
                [f"cache ({c['inputs']})", f"{cm['train_images_per_s']:,.1f}", f"{cm['val_accuracy']:.3f}"],
                [
                    "online, ready clips in device memory",
                    f"{om['train_images_per_s']:,.1f}",
                    f"{om['val_accuracy']:.3f}",
                ],
            ],
        )
    )
    print(f"train_speedup = {fmt(speedup, 2)} (DESIGN target for images: >= 10)")
    print()
    put(kv, "decode_clips_per_s", s["decode"], 1)
    put(kv, "forward_clips_per_s", s["forward"], 1)
    put(kv, "writer_clips_per_s", s["writer"], 1)
    put(kv, "extract_clips_per_s", a["whole"], 1)
    put(kv, "extract_vs_forward", extract_vs_forward)
    put(kv, "pipeline_efficiency", efficiency)
    kv["bytes_per_clip"] = str(int(per_clip))
    kv["vivit_b16_16f_bytes_per_clip"] = str(vivit_b)
    put(kv, "train_cache_clips_per_s", cm["train_images_per_s"], 1)
    put(kv, "train_online_clips_per_s", om["train_images_per_s"], 1)
    put(kv, "train_speedup", speedup, 2)
    put(kv, "val_acc_cache", cm["val_accuracy"])
    put(kv, "val_acc_online", om["val_accuracy"])
    common.print_kv(kv)


# --smoke: timm's 6-block test ViT at 32 px, 4 frames, 8 videos, one epoch
SMOKE = {"backbone": "test_vit", "image_size": 32, "frames": 4, "videos": 8, "epochs": 1, "train_batch_size": 4}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--backbone", help="timm ViT (default: vit_tiny_patch16_224 on CPU, vit_base_patch16_224 on CUDA)")
    p.add_argument("--image-size", type=int, help="frame size in pixels (default: 64 on CPU, 224 on CUDA)")
    p.add_argument("--frames", type=int, help="frames per clip (default: 8 on CPU, 16 on CUDA)")
    p.add_argument("--tubelet", type=int, default=2)
    p.add_argument("--videos", type=int, help="videos written, a quarter per class (default: 128 on CPU, 512 on CUDA)")
    p.add_argument("--size", type=int, help="the videos' frame size (default: the image size)")
    p.add_argument("--batch-size", default="auto", help="extraction batch (clips); auto: sized by bytes per clip")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-batch-size", type=int, default=16)
    p.add_argument("--data-dir", help="working dir (default: a temporary dir, removed after)")
    args = common.parse_with_smoke(p, argv, SMOKE)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    args.backbone = args.backbone or ("vit_base_patch16_224" if gpu else "vit_tiny_patch16_224")
    args.image_size = args.image_size or (224 if gpu else 64)
    args.frames = args.frames or (16 if gpu else 8)
    args.videos = args.videos or (512 if gpu else 128)
    args.size = args.size or args.image_size
    args.batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    load_start = common.load_average()
    from services.video.synthetic import write_motion

    with common.workdir(args.data_dir, "sidetune-bench-video-") as work:
        args.work = work
        t0 = time.perf_counter()
        write_motion(work / "motion", per_class=max(1, args.videos // 4), frames=16, size=args.size)
        args.dataset = Path(work / "motion" / "train")
        say(f"wrote {args.videos} videos in {time.perf_counter() - t0:.1f} s")
        a = measure_extraction(args)
        c = measure_training(args, a["result"]["cache_key"])
        report(args, a, c, load_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
