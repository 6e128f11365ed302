"""Serving benchmark: predict latency and throughput over HTTP against the bare backbone forward in the serving dtype,
many models on one backbone, /healthz under load, and the memory an extra model costs, all measured in one run.

    .venv/bin/python bench/serve.py                          # CPU: vit_small_patch16_224 at 224 px, 8 LoSA models
    .venv/bin/python bench/serve.py --device cuda --requests 640 --concurrency 32
    .venv/bin/python bench/serve.py --smoke                  # test_vit, 2 models, a few requests: about a minute

Setup: scikit-learn digits are written, the backbone (RANDOM INIT, pretrained=False) extracts their features once
(`run_extraction`), `--models` LoSA models (rank `--rank`, all layers, seeds 0..n-1) are each trained for `--epochs`
epochs from that cache, and a LoRA model (rank 8 on every block, `images` mode: a merged model whose every linear layer
differs from the backbone's) for one epoch, all by `train_job`, saved in the store and registered in Redis as the train
step does. A real Redis server, the inference service (`sidetune inference`) and the API (`sidetune api`, forwarding
predict to it) run as subprocesses on loopback, with their settings from SIDETUNE_* variables; a second inference
service with `predict_max_batch=1` (batching off) is the reference for the batching gain.

Rows, interleaved over `--repeats` rounds (latency percentiles pool every round's requests; throughput is the median of
the rounds, each round's value listed):
- bare forward: `model(x)` of the backbone in the serving dtype (bfloat16 weights on CUDA, float32 on the CPU) on one
  ready image tensor, in this process, same device and torch threads as the service (idle meanwhile): the baseline.
- Predictor.predict in this process, one PNG: decoding, transform, backbone, side network; no HTTP, no batcher.
- HTTP, 1 client, one image per request, one request at a time (keep-alive), model 1: through the API (forwarded to
  the inference service: what clients get at the public URL), and directly to the inference service.
- HTTP, `--concurrency` clients, `--requests` requests of one image, straight to the inference service: on 1 model and
  spread over all models (request i to model i mod n); with batching off for 1 model.
Then, once: /healthz of the API and of the inference service, probed every 20 ms from this process while a separate
process keeps `--health-load` predicts in flight through the API for `--health-seconds` (so the probe shares no GIL or
client with the load); and the memory of a Predictor in this process as it loads the backbone with a first LoSA model,
a second LoSA model, and the merged LoRA model (resident set after garbage collection and malloc_trim on the CPU,
allocated device memory on CUDA), against the backbone's size in the serving dtype.

Last, the micro model's rows (bench/serve_http.py: a linear probe on test_vit, its own inference service and API, one
torch thread): in process, straight to the inference service, through the API, interleaved request by request.

Targets (DESIGN.md, issue 11): latency_ratio = p50 of "HTTP, 1 client" through the API / p50 of the bare forward
<= 1.2; http_overhead_ms = the micro model's p50 straight to the inference service - its p50 in process <= 3;
multi_model_cost_ratio = images/s on 1 model / images/s spread over the models <= 1.3; health_p99_ms (the higher of
the two services' p99) <= 50; extra_model_mb_losa <= 0.1 x backbone_mb; extra_model_mb_merged <= 1.05 x backbone_mb.
Last line: `key=value` pairs.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import gc
import io
import json
import sys
import time

import common
from common import median
from serve_http import Service, drive, health_under_load, micro_rows, register
from serve_report import report

SMOKE = {
    "backbone": "test_vit",
    "image_size": 160,
    "models": 2,
    "rank": 4,
    "requests": 8,
    "concurrency": 2,
    "single_requests": 4,
    "repeats": 1,
    "health_load": 4,
    "health_seconds": 1.0,
    "micro_requests": 10,
}


# ------------------------------------------------------------------------------------------------- setup


def train_models(args: argparse.Namespace, settings, store) -> tuple[list[str], str, list[str]]:
    """`--models` LoSA models trained from one feature cache and a LoRA model, saved and registered; returns the LoSA
    ids, the LoRA id and the classes."""
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter
    from services.spec import JobSpec
    from storage.artifacts import ArtifactStore

    artifacts = ArtifactStore.from_settings(settings)
    backbone = {"name": args.backbone, "pretrained": False, "image_size": args.image_size}
    ids, key, classes = [], None, []
    for seed in range(args.models):
        spec = JobSpec.model_validate(
            {
                "dataset": {"path": str(args.dataset)},
                "backbone": backbone,
                "method": {"name": "losa", "rank": args.rank},
                "extraction": {"batch_size": 16},
                "training": {"epochs": args.epochs, "batch_size": 16, "seed": seed},
            }
        )
        if key is None:
            common.say("extracting the features once for every model ...")
            key = run_extraction(spec, settings, NullReporter())["cache_key"]
        out, _ = common.train_fresh(spec, settings, key, args.work / "ckpt")
        model_id, classes = f"model_bench_losa_{seed}", out["manifest"].classes
        artifacts.save_model(model_id, out["weights"], out["manifest"], out["metrics"])
        register(store, model_id, out, "losa", "cache", args.backbone)
        ids.append(model_id)
        common.say(f"trained {model_id}: val accuracy {out['metrics']['val_accuracy']:.3f}")
    spec = JobSpec.model_validate(
        {
            "dataset": {"path": str(args.dataset)},
            "backbone": backbone,
            "method": {"name": "lora", "rank": 8},
            "execution": {"mode": "images"},
            "training": {"epochs": 1, "batch_size": 16},
        }
    )
    out, _ = common.train_fresh(spec, settings, None, args.work / "ckpt")
    artifacts.save_model("model_bench_lora", out["weights"], out["manifest"], out["metrics"])
    register(store, "model_bench_lora", out, "lora", "images", args.backbone)
    common.say(f"trained model_bench_lora (merged): val accuracy {out['metrics']['val_accuracy']:.3f}")
    return ids, "model_bench_lora", classes


def _trim() -> None:
    gc.collect()
    if common.glibc():
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the resident set shows what is held


def memory(settings, device: str, losa: list[str], merged: str) -> dict:
    """Bytes a Predictor holds as it loads a first LoSA model (with the backbone), a second one, then the merged
    model: measured (resident set on the CPU, allocated memory on CUDA) and accounted (its tensors)."""
    import torch

    from services.serving.inference import Predictor

    def used() -> int:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        _trim()
        return common.current_rss()

    predictor = Predictor(settings)
    steps = {}
    base = used()
    for name, model_id in (("backbone + first LoSA", losa[0]), ("extra LoSA", losa[1]), ("extra merged", merged)):
        predictor.load(model_id)
        now = used()
        steps[name], base = now - base, now
    held = predictor.memory()
    backbone = next(iter(held["backbones"].values()))
    dtype = str(predictor.load(losa[0]).backbone.dtype)
    return {"measured": steps, "models": held["models"], "backbone": backbone, "dtype": dtype}


def timed(fn, n: int, device: str) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        common.sync(device)
        out.append(time.perf_counter() - t0)
    return out


def measure(args: argparse.Namespace) -> dict:
    import torch
    from PIL import Image

    from services.backbones import load_backbone
    from services.data.datasets import read_imagefolder
    from services.serving.inference import Predictor
    from services.spec import BackboneSpec
    from storage.redis import JobStore
    from storage.redis_server import RedisServer
    from worker.launcher import free_port

    settings = common.make_settings(args.work, args.work, args.device)
    pngs = []
    for p in read_imagefolder(args.dataset).paths[:16]:
        buf = io.BytesIO()
        Image.open(p).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    bodies = [json.dumps({"instances": [{"image_b64": base64.b64encode(b).decode()}]}).encode() for b in pngs]

    redis = RedisServer(args.work / "redis", free_port()).start()
    services: list[Service] = []
    try:
        store = JobStore.from_url(redis.url)
        ids, merged, classes = train_models(args, settings, store)
        batched = Service(
            args,
            redis.url,
            "inference",
            "batched",
            predict_max_batch=args.max_batch,
            predict_max_wait_ms=args.max_wait_ms,
        )
        unbatched = Service(args, redis.url, "inference", "unbatched", predict_max_batch=1)
        api = Service(args, redis.url, "api", "api", inference_url=batched.url)
        services = [batched, unbatched, api]
        for service in services:
            service.wait()
        common.say("warming up: every model loaded in both inference services ...")
        for url in (api.url, unbatched.url):
            drive(url, ids, bodies, 2 * len(ids), 1)

        common.say("memory of the models ...")
        mem = memory(settings, args.device, ids, merged)
        backbone = load_backbone(
            BackboneSpec(name=args.backbone, pretrained=False, image_size=args.image_size), args.device
        )  # in the serving precision: bf16 weights on CUDA
        dtype = backbone.dtype
        x = backbone.transform(Image.open(io.BytesIO(pngs[0])).convert("RGB"))[None].to(args.device, dtype)
        predictor = Predictor(settings)
        predictor.predict(ids[0], pngs[:1])

        def bare() -> None:
            with torch.inference_mode():
                backbone.model(x)

        rows: dict[str, dict[str, list]] = {}

        def add(name: str, lat: list[float], rate: float, failures: int = 0) -> None:
            row = rows.setdefault(name, {"lat": [], "rate": [], "failures": []})
            row["lat"] += lat
            row["rate"].append(rate)
            row["failures"].append(failures)

        for _ in range(3):  # warm the bare forward too (allocator, kernels)
            bare()
        n, c, load = args.single_requests, args.concurrency, (args.requests, args.concurrency)
        for r in range(args.repeats):
            common.say(f"round {r + 1}/{args.repeats}")
            lat = timed(bare, n, args.device)
            add(f"bare forward model(x), 1 image, {str(dtype).removeprefix('torch.')}", lat, 1 / median(lat))
            lat = timed(lambda: predictor.predict(ids[0], pngs[:1]), n, args.device)
            add("Predictor.predict in process, 1 PNG", lat, 1 / median(lat))
            for name, url, models, total, clients in [
                ("HTTP via the API, 1 client, 1 model", api.url, ids[:1], n, 1),
                ("HTTP to inference, 1 client, 1 model", batched.url, ids[:1], n, 1),
                (f"HTTP to inference, {c} clients, 1 model", batched.url, ids[:1], *load),
                (f"HTTP to inference, {c} clients, {len(ids)} models", batched.url, ids, *load),
                (f"HTTP to inference, {c} clients, 1 model, batching off", unbatched.url, ids[:1], *load),
            ]:
                d = drive(url, models, bodies, total, clients)
                add(name, d["latencies"], total / d["wall_s"], len(d["failures"]))
                if d["failures"]:
                    common.say(f"{name}: {len(d['failures'])} failed, e.g. {d['failures'][0]}")
        common.say(f"/healthz while {args.health_load} predicts run through the API for {args.health_seconds}s ...")
        health = health_under_load(args, api.url, batched.url, ids[0], bodies[0])
        params = sum(p.numel() for p in backbone.model.parameters())
        for service in services:  # the micro model's services run alone
            service.stop()
        common.say("the HTTP overhead on a micro model (bench/serve_http.py) ...")
        micro = micro_rows(args, redis.url, args.micro_requests)
        return {
            "rows": rows,
            "classes": classes,
            "models": ids,
            "params": params,
            "health": health,
            "memory": mem,
            "micro": micro,
        }
    finally:
        for service in services:
            service.stop()
        redis.stop()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_small_patch16_224", help="timm ViT, random init")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (the services' and the baseline's)")
    p.add_argument("--models", type=int, default=8, help="LoSA models on the backbone (at least 2)")
    p.add_argument("--rank", type=int, default=16, help="LoSA rank")
    p.add_argument("--epochs", type=int, default=1, help="training epochs per LoSA model")
    p.add_argument("--train-images", type=int, default=40, help="digits written (10%% held out, unused)")
    p.add_argument("--requests", type=int, help="requests per load row (default: 96 on CPU, 640 on CUDA)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients of the load rows")
    p.add_argument("--single-requests", type=int, default=30, help="requests per round of the 1-client rows")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--health-load", type=int, default=64, help="predicts in flight while /healthz is probed")
    p.add_argument("--health-seconds", type=float, default=15.0, help="how long /healthz is probed under that load")
    p.add_argument("--max-batch", type=int, default=32, help="the inference service's predict_max_batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the inference service's predict_max_wait_ms")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads of the services and of the baseline (default: torch's, one per core); "
        "1 is steadier on a machine whose cores other processes use too",
    )
    p.add_argument("--micro-requests", type=int, default=100, help="requests per row of the micro model's rows")
    p.add_argument("--data-dir", help="working dir (default: a temporary dir, removed after)")
    args = common.parse_with_smoke(p, argv, SMOKE)
    if args.models < 2:
        p.error("--models: at least 2 (the memory of an extra LoSA model is measured on the second)")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.requests = args.requests or (640 if args.device.startswith("cuda") else 96)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.t_start, args.load_start = time.perf_counter(), common.load_average()
    with common.workdir(args.data_dir, "sidetune-bench-serve-") as work:
        args.work = work
        args.dataset = common.digits_dir(work)
        counts = common.write_digits(work, args.train_images)
        common.say(f"data in {work}: {counts['train']} digits")
        report(args, measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
