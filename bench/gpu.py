"""The GPU box's figures in one command: extraction against its ceiling, training from the cache against online,
memory at batch size 1, bf16 against fp32, torch.compile, and serving latency, on vit_base_patch16_224 at 224 px.

    python3 bench/gpu.py --out $OUT/gpu.kv              # on the GPU machine (bench/README.md: wheels, the command)
    .venv/bin/python bench/gpu.py --smoke                # anywhere: the same phases, tiny sizes, on the CPU (its test)

Each phase appends one `phase=<name> key=value ...` line to `--out` (flushed and fsync'd) as soon as it ends, so a run
cut short by a time limit still reports what it measured; the last line on stdout is every key=value together.
Ceilings as in bench/cache.py: each stage alone (decode on the production loader processes; the bare forward on
batches already in device memory; the writer against the disk's raw fsync'd sequential writes of shard-sized files),
`pipeline_efficiency` = whole / the slowest stage on a GPU (1 / sum(1 / stage) on a CPU, where they share cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import cache_extract
import common
from cache_extract import decode_rate, disk_mb_s, forward_rate, writer_rate
from cache_training import fit_online_ready, steady_img_s
from common import fmt, median, ratio, render, say
from photos import write_photos


class Results:
    """key=value lines appended to a file as each phase ends, and collected for the final line."""

    def __init__(self, path: Path) -> None:
        self.path, self.all = path, {}
        path.parent.mkdir(parents=True, exist_ok=True)

    def phase(self, name: str, values: dict[str, Any], t0: float) -> None:
        kv = {k: ("nan" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in values.items()}
        kv[f"{name}_s"] = f"{time.perf_counter() - t0:.1f}"
        self.all |= kv
        with open(self.path, "a") as f:
            f.write(f"phase={name} " + " ".join(f"{k}={v}" for k, v in kv.items()) + "\n")
            f.flush()
            os.fsync(f.fileno())
        say(f"[{name}] " + " ".join(f"{k}={v}" for k, v in kv.items()))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help="test_vit at 32 px, 8 photos, 40 digits: every phase on a CPU")
    p.add_argument("--backbone", default="vit_base_patch16_224")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--photos", type=int, default=2048)
    p.add_argument("--digits", type=int, default=1797)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="LoSA training epochs (the first holds any compilation)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--precision", default="auto")
    p.add_argument("--loader-workers", default="auto")
    p.add_argument(
        "--stage-loaders",
        type=int,
        help="loader processes of the decode stage (default: the production count on a GPU, one a core on a CPU)",
    )
    p.add_argument("--cache-writers", type=int, default=4)
    p.add_argument("--serve-requests", type=int, default=64)
    p.add_argument("--out", default=os.environ.get("OUT", ".") + "/gpu.kv", help="key=value lines, one per phase")
    p.add_argument("--data-dir", help="working dir (default: a temporary dir, removed after)")
    args = common.parse_with_smoke(p, argv, {"tiny": True, "device": "cpu"})  # --smoke: --tiny on the CPU
    if args.tiny:
        args.backbone, args.image_size, args.photos, args.digits = "test_vit", 32, 8, 40
        args.batch_size, args.epochs, args.serve_requests = 16, 2, 8
        # the decode stage in this process: a forkserver's imports cost more CPU than the rest of the stage
        args.stage_loaders = 0 if args.stage_loaders is None else args.stage_loaders
    args.loader_workers = args.loader_workers if args.loader_workers == "auto" else int(args.loader_workers)
    args.train_memory_mb, args.limit = None, args.digits
    return args


def phase_env(args: argparse.Namespace, res: Results) -> None:
    import torch

    t0 = time.perf_counter()
    env = {
        "torch": torch.__version__,
        "device": args.device,
        "cores": cache_extract.cores(),
        "backbone": args.backbone,
        "image_size": args.image_size,
    }
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(args.device)).replace(" ", "_")
    res.phase("env", env, t0)


def phase_extraction(args: argparse.Namespace, res: Results) -> dict[str, Any]:
    """Stages alone and whole extractions, photos and digits."""
    import torch

    from services.backbones import load_backbone
    from services.data.datasets import read_dataset
    from services.data.loading import BatchReader, iterate, loader_workers
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter
    from services.spec import BackboneSpec

    t0 = time.perf_counter()
    gpu = args.device.startswith("cuda")
    spec = BackboneSpec(name=args.backbone, pretrained=False, image_size=args.image_size, precision=args.precision)
    backbone = load_backbone(spec, args.device)
    layers = list(range(backbone.num_layers))
    workers = loader_workers(cache_extract.settings_for(args, "probe"), 10**6)
    stage_workers = args.stage_loaders
    if stage_workers is None:
        stage_workers = workers if gpu else max(workers, cache_extract.cores())
    out: dict[str, Any] = {"precision": backbone.precision, "loader_workers": workers}
    rows = []
    for name, root in args.datasets.items():
        dataset = read_dataset(root)
        n, bs = len(dataset), args.batch_size
        batches = [list(range(s, min(n, s + bs))) for s in range(0, n, bs)]
        decode_rate(dataset, backbone.split, bs, stage_workers)  # warm: forkserver, page cache
        decode = decode_rate(dataset, backbone.split, bs, stage_workers)
        ready = [
            backbone.input(b.images)
            for b in iterate(BatchReader(dataset.paths, batches, backbone.split.pil, False), stage_workers)
        ]
        forward_rate(backbone, ready[:2], layers, args.device)  # warm-up
        forward = median([forward_rate(backbone, ready, layers, args.device) for _ in range(3)])
        acts = [backbone.intermediates(x, layers, torch.float16).cpu().numpy() for x in ready]
        writer, _ = writer_rate(args, acts, "none", None, name)
        disk = disk_mb_s(args.work, acts[0].nbytes, max(8, len(acts)))
        writer_mb_s = writer * acts[0][0].nbytes / common.MB
        del ready, acts
        shutil.rmtree(args.work / "runs", ignore_errors=True)
        job = cache_extract.job_spec(args, "losa", dataset=root)
        whole = run_extraction(job, cache_extract.settings_for(args, f"extract {name}"), NullReporter())
        ceiling = min(decode, forward, writer) if gpu else 1 / (1 / decode + 1 / forward + 1 / writer)
        out[name] = {
            "decode": decode,
            "forward": forward,
            "writer": writer,
            "whole": whole["extract_images_per_s"],
            "ceiling": ceiling,
            "disk_mb_s": disk,
            "writer_mb_s": writer_mb_s,
            "key": whole["cache_key"],
            "settings": cache_extract.settings_for(args, f"extract {name}"),
        }
        rows.append(
            [
                name,
                str(n),
                fmt(decode, 0),
                fmt(forward, 0),
                fmt(writer, 0),
                fmt(ceiling, 0),
                fmt(whole["extract_images_per_s"], 0),
                fmt(ratio(whole["extract_images_per_s"], ceiling), 3),
                fmt(writer_mb_s, 0),
                fmt(disk, 0),
            ]
        )
    print(
        render(
            [
                "dataset",
                "images",
                "decode/s",
                "forward/s",
                "writer/s",
                "ceiling",
                "extract/s",
                "efficiency",
                "writer MB/s",
                "disk MB/s",
            ],
            rows,
        )
    )
    digits = out["digits"]
    error = cache_extract.bf16_error(
        args,
        backbone,
        backbone.input(
            next(
                iterate(
                    BatchReader(
                        read_dataset(args.datasets["digits"]).paths, [list(range(8))], backbone.split.pil, False
                    ),
                    0,
                )
            ).images
        ),
        layers,
    )
    res.phase(
        "extraction",
        {
            "precision": backbone.precision,
            "loader_workers": workers,
            "stage_loaders": stage_workers,
            **{
                f"{k}_img_s_{name}": out[name][k]
                for name in args.datasets
                for k in ("decode", "forward", "writer", "whole")
            },
            "pipeline_efficiency_photos": ratio(out["photos"]["whole"], out["photos"]["ceiling"]),
            "pipeline_efficiency_digits": ratio(digits["whole"], digits["ceiling"]),
            "extract_ratio": ratio(digits["whole"], digits["forward"]),
            "writer_vs_disk": ratio(digits["writer_mb_s"], digits["disk_mb_s"]),
            "bf16_rel_error": error,
        },
        t0,
    )
    return out


def phase_training(args: argparse.Namespace, res: Results, ext: dict[str, Any]) -> None:
    """LoSA from the cache (device-resident) against online from ready batches; compile; memory at batch 1."""
    import torch

    from services.backbones import load_backbone
    from services.data.datasets import read_dataset
    from services.data.loading import BatchReader, iterate
    from services.jobs.progress import NullReporter
    from services.training.job import train_job

    t0 = time.perf_counter()
    digits = ext["digits"]
    values: dict[str, Any] = {}
    for compiled in (False, True):
        spec = cache_extract.job_spec(args, "losa", compile=compiled)
        reporter = NullReporter()
        ckpt = args.work / "ckpt" / f"cache-{compiled}"
        out = train_job(spec, digits["settings"], digits["key"], reporter, ckpt)
        m = out["metrics"]
        tag = "compiled" if compiled else "cache"
        values[f"{tag}_img_s"] = m["train_images_per_s"]
        values[f"{tag}_steady_img_s"] = steady_img_s(reporter, m["train_images"])
        values[f"{tag}_first_step_s"] = m["first_step_seconds"]
        values[f"{tag}_inputs"] = (
            next(e["message"] for e in reporter.events if "inputs: " in e["message"])
            .split("inputs: ")[-1]
            .replace(" ", "_")
        )
    spec = cache_extract.job_spec(args, "losa", "online")
    backbone = load_backbone(spec.backbone, args.device)
    dataset = read_dataset(args.datasets["digits"])
    n = len(dataset)
    batches = [list(range(s, min(n, s + 256))) for s in range(0, n, 256)]
    images = torch.cat([b.images for b in iterate(BatchReader(dataset.paths, batches, backbone.split.pil, False), 0)])
    m = fit_online_ready(backbone, spec, images, dataset.labels, len(dataset.classes), args.work / "ckpt" / "online")
    values["online_ready_img_s"] = m["train_images_per_s"]
    values["train_speedup"] = ratio(values["cache_img_s"], values["online_ready_img_s"])
    values["compile_speedup"] = ratio(values["compiled_steady_img_s"], values["cache_steady_img_s"])
    del images, backbone
    # peak memory at batch size 1 (the paper's convention): cache streamed against online, 1 epoch each
    for mode, memory_mb in (("cache", 0), ("online", None)):
        spec = cache_extract.job_spec(args, "losa", mode, epochs=1, train_batch=1)
        settings = digits["settings"].model_copy(update={"train_memory_mb": memory_mb})
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        out = train_job(
            spec,
            settings,
            digits["key"] if mode == "cache" else None,
            NullReporter(),
            args.work / "ckpt" / f"mem-{mode}",
        )
        values[f"mem_mb_{mode}"] = out["metrics"].get("peak_memory_mb", float("nan"))
    values["train_mem_ratio"] = ratio(values["mem_mb_cache"], values["mem_mb_online"])
    res.phase("training", values, t0)


def phase_serving(args: argparse.Namespace, res: Results, ext: dict[str, Any]) -> None:
    """Batch-1 predict latency against the bare forward in the serving dtype; 8 LoSA models on one backbone against 1,
    requests from 8 threads through the batcher."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from PIL import Image

    from services.jobs.progress import NullReporter
    from services.serving.batching import Batcher
    from services.serving.inference import Predictor
    from services.training.job import train_job
    from storage.artifacts import ArtifactStore

    t0 = time.perf_counter()
    digits = ext["digits"]
    settings = digits["settings"].model_copy(update={"predict_max_batch": 32})
    store = ArtifactStore.from_settings(settings)
    ids = []
    for i in range(8):
        spec = cache_extract.job_spec(args, "losa", epochs=1, seed=i)
        out = train_job(spec, settings, digits["key"], NullReporter(), args.work / "ckpt" / f"serve-{i}")
        ids.append(f"model_bench{i}")
        store.save_model(ids[-1], out["weights"], out["manifest"], out["metrics"])
    paths = sorted(Path(args.datasets["photos"]).glob("*/*.jpg"))[: args.serve_requests]
    blobs = [p.read_bytes() for p in paths]
    predictor = Predictor(settings)
    predictor.predict(ids[0], blobs[:1])  # loads the backbone and the model
    backbone = predictor.load(ids[0]).backbone
    x = backbone.transform(Image.open(io.BytesIO(blobs[0])).convert("RGB"))[None].to(backbone.device, backbone.dtype)

    def timed(fn, reps: int) -> list[float]:
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            out.append((time.perf_counter() - t) * 1000)
        return out

    with torch.inference_mode():
        timed(lambda: backbone.model(x), 5)
        bare = median(timed(lambda: backbone.model(x), args.serve_requests))
    timed(lambda: predictor.predict(ids[0], blobs[:1]), 5)
    one = median(timed(lambda: predictor.predict(ids[0], blobs[:1]), args.serve_requests))
    batcher = Batcher.from_settings(predictor)
    for m in ids:
        batcher.predict(m, blobs[:1])

    def throughput(models: list[str]) -> float:
        t = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda i: batcher.predict(models[i % len(models)], [blobs[i % len(blobs)]]),
                    range(args.serve_requests * 4),
                )
            )
        return args.serve_requests * 4 / (time.perf_counter() - t)

    single, multi = throughput(ids[:1]), throughput(ids)
    batcher.close()
    res.phase(
        "serving",
        {
            "bare_forward_ms": bare,
            "predict_ms": one,
            "latency_ratio": ratio(one, bare),
            "img_s_1_model": single,
            "img_s_8_models": multi,
            "multi_model_cost_ratio": ratio(single, multi),
        },
        t0,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t_start = time.perf_counter()
    res = Results(Path(args.out))
    with common.workdir(args.data_dir, "sidetune-bench-gpu-") as work:
        args.work = work
        phase_env(args, res)
        t0 = time.perf_counter()
        digits = common.digits_dir(work)
        counts = common.write_digits(work, args.digits)
        photos = write_photos(work / "datasets" / "photos", args.photos)
        args.datasets, args.dataset = {"photos": photos, "digits": digits}, digits
        res.phase("data", {"photos": args.photos, "digits": counts["train"]}, t0)
        ext = phase_extraction(args, res)
        phase_training(args, res, ext)
        phase_serving(args, res, ext)
    res.all["wall_s"] = f"{time.perf_counter() - t_start:.0f}"
    print(json.dumps(res.all, indent=1), file=sys.stderr)
    common.print_kv(res.all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
