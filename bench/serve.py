"""Serving benchmark: predict latency and throughput over HTTP, against the bare backbone forward in the same run.

    .venv/bin/python bench/serve.py                          # CPU: vit_small_patch16_224 at 224 px, 8 LoSA models
    .venv/bin/python bench/serve.py --device cuda --requests 640 --concurrency 32

Setup: scikit-learn digits are written, the backbone (RANDOM INIT, pretrained=False) extracts their features once
(`run_extraction`), and `--models` LoSA models (rank `--rank`, all layers, seeds 0..n-1) are each trained for
`--epochs` epochs from that cache by `train_job`, saved in the artifact store and registered in Redis, as the train
step does. A real Redis server (storage/redis_server.py) and the API (`sidetune api`: uvicorn in a subprocess, with its
settings from SIDETUNE_* variables) run on loopback; a second API with `predict_max_batch=1` (batching off) serves
as a reference.

Rows, interleaved over `--repeats` rounds (latency percentiles pool every round's requests; throughput is the median
of the rounds, each round's value listed):
- bare forward: `model(x)` of the backbone on one ready image tensor, in this process, same device, precision
  (bfloat16 autocast on CUDA, fp32 on CPU) and torch threads as the API (which is idle meanwhile): the baseline.
- Predictor.predict in this process, one PNG: decoding, transform, backbone, side network; no HTTP, no batcher.
- HTTP, 1 client: one image per request, one request at a time (keep-alive), model 1.
- HTTP, `--concurrency` clients, `--requests` requests of one image, on 1 model and spread over all models (request
  i to model i mod n); with batching off for 1 model.

latency_ratio = p50 of "HTTP, 1 client" / p50 of the bare forward (target <= 1.2); multi_model_cost_ratio = images/s
on 1 model / images/s spread over the models (cost per image, target <= 1.3). Last line: `key=value` pairs.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import subprocess
import sys
import threading
import time

import common
import numpy as np
from common import fmt, median, spread

TARGETS = {"latency_ratio": 1.2, "multi_model_cost_ratio": 1.3}  # DESIGN.md, "Targets"


# ------------------------------------------------------------------------------------------------- setup


def train_models(args: argparse.Namespace, settings, store) -> tuple[list[str], list[str]]:
    """`--models` LoSA models trained from one feature cache, saved and registered; returns their ids and classes."""
    from services.extraction import run_extraction
    from services.progress import NullReporter
    from services.spec import JobSpec
    from storage.artifacts import ArtifactStore
    from storage.jobs import now

    artifacts = ArtifactStore.from_settings(settings)
    ids, key, config = [], None, {}
    for seed in range(args.models):
        spec = JobSpec.model_validate({
            "dataset": {"path": str(args.dataset)},
            "backbone": {"name": args.backbone, "pretrained": False, "image_size": args.image_size},
            "method": {"name": "losa", "rank": args.rank}, "extraction": {"batch_size": 16},
            "training": {"epochs": args.epochs, "batch_size": 16, "seed": seed},
        })  # fmt: skip
        if key is None:
            common.say("extracting the features once for every model ...")
            key = run_extraction(spec, settings, NullReporter())["cache_key"]
        out, _ = common.train_fresh(spec, settings, key, args.work / "ckpt")
        model_id, config = f"model_bench_losa_{seed}", out["config"]
        artifacts.save_model(model_id, out["weights"], config, out["metrics"])
        store.register_model({
            "id": model_id, "object": "model", "created_at": now(), "job_id": f"job_bench_{seed}", "owner": None,
            "name": None, "method": "losa", "mode": "cache", "backbone": args.backbone, "classes": config["classes"],
            "metrics": out["metrics"],
        })  # fmt: skip
        ids.append(model_id)
        common.say(f"trained {model_id}: val accuracy {out['metrics']['val_accuracy']:.3f}")
    return ids, config["classes"]


class Api:
    """`sidetune api` in a subprocess on a free loopback port, with the bench's settings and `overrides`."""

    def __init__(self, args: argparse.Namespace, redis_url: str, name: str, **overrides: object) -> None:
        from worker.launcher import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | {
            "SIDETUNE_REDIS_URL": redis_url, "SIDETUNE_DATA_DIR": str(args.work), "SIDETUNE_DEVICE": args.device,
            "SIDETUNE_API_HOST": "127.0.0.1", "SIDETUNE_API_PORT": str(self.port),
            "SIDETUNE_ALLOWED_ROOTS": str(args.work), "PYTHONUNBUFFERED": "1",
        } | {f"SIDETUNE_{k.upper()}": str(v) for k, v in overrides.items()}  # fmt: skip
        if args.threads:  # torch's intra-op threads in the API, as torch.set_num_threads in this process
            env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        self.log = args.work / f"api-{name}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "api"], cwd=common.ROOT, env=env,
                                         stdout=log, stderr=subprocess.STDOUT)  # fmt: skip

    def wait(self, timeout_s: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the API did not answer within {timeout_s}s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------------------------------------ measure


def drive(url: str, models: list[str], bodies: list[bytes], total: int, clients: int) -> dict:
    """`clients` threads, each with its own keep-alive connection, send `total` requests between them (request i to
    models[i % n]); returns every request's latency (s), the wall time and the failures."""
    import httpx

    counter = itertools.count()
    latencies: list[float] = []
    failures: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=300, headers={"content-type": "application/json"}) as c:
            while (i := next(counter)) < total:
                t0 = time.perf_counter()
                r = c.post(f"{url}/v1/models/{models[i % len(models)]}:predict", content=bodies[i % len(bodies)])
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200 or "predictions" not in r.json():
                    failures.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "wall_s": time.perf_counter() - t0, "failures": failures}


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
    from services.datasets import read_imagefolder
    from services.inference import Predictor
    from services.spec import BackboneSpec
    from storage.jobs import JobStore
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
    apis: list[Api] = []
    try:
        store = JobStore.from_url(redis.url)
        ids, classes = train_models(args, settings, store)
        apis = [Api(args, redis.url, "batched", predict_max_batch=args.max_batch, predict_max_wait_ms=args.max_wait_ms),
                Api(args, redis.url, "unbatched", predict_max_batch=1)]  # fmt: skip
        for api in apis:
            api.wait()
        common.say("warming up: every model loaded in both APIs ...")
        for api in apis:
            drive(api.url, ids, bodies, 2 * len(ids), 1)

        backbone = load_backbone(BackboneSpec(name=args.backbone, pretrained=False, image_size=args.image_size),
                                 args.device)  # fmt: skip
        x = backbone.transform(Image.open(io.BytesIO(pngs[0])).convert("RGB"))[None].to(args.device)
        predictor = Predictor(settings)
        predictor.predict(ids[0], pngs[:1])

        def bare() -> None:
            # the precision predict runs the backbone in (Backbone.intermediates: bfloat16 autocast on CUDA only)
            cuda = backbone.device.type == "cuda"
            with torch.inference_mode(), torch.autocast(backbone.device.type, torch.bfloat16, enabled=cuda):
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
            add("bare forward model(x), 1 image", lat, 1 / median(lat))
            lat = timed(lambda: predictor.predict(ids[0], pngs[:1]), n, args.device)
            add("Predictor.predict in process, 1 PNG", lat, 1 / median(lat))
            for name, api, models, total, clients in [
                ("HTTP, 1 client, 1 model", apis[0], ids[:1], n, 1),
                (f"HTTP, {c} clients, 1 model", apis[0], ids[:1], *load),
                (f"HTTP, {c} clients, {len(ids)} models", apis[0], ids, *load),
                (f"HTTP, {c} clients, 1 model, batching off", apis[1], ids[:1], *load),
            ]:  # fmt: skip
                d = drive(api.url, models, bodies, total, clients)
                add(name, d["latencies"], total / d["wall_s"], len(d["failures"]))
                if d["failures"]:
                    common.say(f"{name}: {len(d['failures'])} failed, e.g. {d['failures'][0]}")
        params = sum(p.numel() for p in backbone.model.parameters())
        return {"rows": rows, "classes": classes, "models": ids, "params": params}
    finally:
        for api in apis:
            api.stop()
        redis.stop()


# ------------------------------------------------------------------------------------------------- report


def report(args: argparse.Namespace, m: dict) -> None:
    import torch

    rows = m["rows"]
    names = list(rows)
    bare_p50 = median(rows[names[0]]["lat"])
    print(
        f"sidetune serve benchmark: {args.backbone} at {args.image_size} px ({m['params']:,} params, RANDOM INIT), "
        f"device {args.device}; {len(m['models'])} LoSA models (rank {args.rank}, all layers, {len(m['classes'])} "
        f"classes), each trained {args.epochs} epoch(s) by train_job from one feature cache of {args.train_images} "
        "digits, saved and registered as the train step does"
    )
    print(common.machine_line(args.load_start))
    print(
        f"API: `sidetune api` (uvicorn) in a subprocess with real Redis; predict_max_batch {args.max_batch}, "
        f"predict_max_wait_ms {args.max_wait_ms}; one 32x32 PNG digit per request (JSON, base64); {args.repeats} "
        "interleaved rounds: latency percentiles over every round's requests, images/s median (rounds listed)"
    )
    print()
    table = []
    for name in names:
        lat = np.array(rows[name]["lat"]) * 1000
        table.append([
            name, str(len(lat)), fmt(float(np.percentile(lat, 50)), 1), fmt(float(np.percentile(lat, 99)), 1),
            fmt(np.median(lat) / 1000 / bare_p50, 2), spread(rows[name]["rate"]), str(sum(rows[name]["failures"])),
        ])  # fmt: skip
    print(common.render(["row", "requests", "p50 ms", "p99 ms", "p50 / bare", "images/s", "failed"], table))

    single, one, many, off = names[2:6]
    latency_ratio = median(rows[single]["lat"]) / bare_p50
    rate_one, rate_many, rate_off = (median(rows[k]["rate"]) for k in (one, many, off))
    cost_ratio = common.ratio(rate_one, rate_many)
    print()
    met = {
        "latency_ratio": latency_ratio <= TARGETS["latency_ratio"],
        "multi_model_cost_ratio": cost_ratio is not None and cost_ratio <= TARGETS["multi_model_cost_ratio"],
    }
    verdict = {k: "met" if v else "MISSED" for k, v in met.items()}
    print(
        f"targets (DESIGN.md): latency_ratio {fmt(latency_ratio, 3)} <= 1.2: {verdict['latency_ratio']}; "
        f"multi_model_cost_ratio {fmt(cost_ratio, 3)} <= 1.3: {verdict['multi_model_cost_ratio']}; batching gain "
        f"(1 model, {args.concurrency} clients, against predict_max_batch 1) {fmt(common.ratio(rate_one, rate_off), 2)}"
        "x"
    )
    kv: dict[str, str] = {}
    for key, value, digits in [
        ("latency_ratio", latency_ratio, 3),
        ("multi_model_cost_ratio", cost_ratio, 3),
        ("bare_ms", bare_p50 * 1000, 2),
        ("predict_p50_ms", median(rows[single]["lat"]) * 1000, 2),
        ("predict_p99_ms", float(np.percentile(rows[single]["lat"], 99)) * 1000, 2),
        ("inprocess_p50_ms", median(rows[names[1]]["lat"]) * 1000, 2),
        ("load_p50_ms", median(rows[one]["lat"]) * 1000, 1),
        ("load_p99_ms", float(np.percentile(rows[one]["lat"], 99)) * 1000, 1),
        ("img_s_1_model", rate_one, 2),
        ("img_s_multi_models", rate_many, 2),
        ("img_s_batching_off", rate_off, 2),
        ("batching_gain", common.ratio(rate_one, rate_off), 2),
    ]:
        common.put(kv, key, value, digits)
    kv |= {
        "targets_met": ",".join(k for k, v in met.items() if v) or "none",
        "targets_missed": ",".join(k for k, v in met.items() if not v) or "none",
        "failed": str(sum(sum(r["failures"]) for r in rows.values())),
        "models": str(len(m["models"])), "concurrency": str(args.concurrency), "requests": str(args.requests),
        "backbone": args.backbone, "image_size": str(args.image_size), "device": args.device,
        "torch_threads": str(torch.get_num_threads()), "wall_s": f"{time.perf_counter() - args.t_start:.0f}",
    }  # fmt: skip
    common.print_kv(kv)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_small_patch16_224", help="timm ViT, random init")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (the API's and the baseline's)")
    p.add_argument("--models", type=int, default=8, help="LoSA models on the backbone")
    p.add_argument("--rank", type=int, default=16, help="LoSA rank")
    p.add_argument("--epochs", type=int, default=1, help="training epochs per model")
    p.add_argument("--train-images", type=int, default=40, help="digits written (10%% held out, unused)")
    p.add_argument("--requests", type=int, help="requests per load row (default: 96 on CPU, 640 on CUDA)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients of the load rows")
    p.add_argument("--single-requests", type=int, default=30, help="requests per round of the 1-client rows")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--max-batch", type=int, default=32, help="the API's predict_max_batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the API's predict_max_wait_ms")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads of the API and of the baseline (default: torch's, one per core); "
        "1 is steadier on a machine whose cores other processes use too",
    )
    p.add_argument("--data-dir", help="working dir (default: a temporary dir, removed after)")
    args = p.parse_args(argv)
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
