"""The HTTP overhead of predict on a micro model, and what bench/serve.py drives its services with.

    .venv/bin/python bench/serve_http.py            # test_vit: a forward of a millisecond or two, so HTTP shows
    .venv/bin/python bench/serve_http.py --smoke    # seconds

Run alone, it trains a linear probe on `test_vit` (timm's test ViT, random init) from a few digits, registers it, starts
a real Redis, `sidetune inference` and `sidetune api` (forwarding predict to it) as subprocesses, and times one PNG per
request, one request at a time, interleaved request by request so that a shared machine's load falls on every row
alike: `Predictor.predict` in this process (decode, transform, forward), HTTP straight to the inference service, and
HTTP through the API; one torch thread everywhere (`micro_rows` says why). http_overhead_ms = p50 straight to the
inference service - p50 in process (target <= 3 ms: what HTTP, the request's checks, the decoder pool and the batcher
add); api_hop_ms = p50 through the API - p50 straight.

For bench/serve.py: `Service` (`sidetune api` or `sidetune inference` in a subprocess), `drive` (client threads),
`health_under_load` (/healthz probed while a separate process keeps predicts in flight), `register` and `micro_model`
(the model above) and `overhead` (the interleaved rows). Last line: `key=value` pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import common
from common import fmt, median

MICRO_BACKBONE = "test_vit"  # 6 blocks of width 64 at 160 px
TARGET_OVERHEAD_MS = 3.0


class Service:
    """`sidetune <command>` (api or inference) in a subprocess on a free loopback port, with the bench's settings."""

    def __init__(self, args: argparse.Namespace, redis_url: str, command: str, name: str, **overrides: object) -> None:
        from worker.launcher import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        which = "API" if command == "api" else "INFERENCE"
        env = (
            os.environ
            | {
                "SIDETUNE_REDIS_URL": redis_url,
                "SIDETUNE_DATA_DIR": str(args.work),
                "SIDETUNE_DEVICE": args.device,
                f"SIDETUNE_{which}_HOST": "127.0.0.1",
                f"SIDETUNE_{which}_PORT": str(self.port),
                "SIDETUNE_ALLOWED_ROOTS": str(args.work),
                "PYTHONUNBUFFERED": "1",
                "SIDETUNE_LOG_FORMAT": "text",
            }
            | {f"SIDETUNE_{k.upper()}": str(v) for k, v in overrides.items()}
        )
        if args.threads:  # torch's intra-op threads in the service, as torch.set_num_threads in this process
            env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        self.log = args.work / f"{command}-{name}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", command],
                cwd=common.ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait(self, timeout_s: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.log.name} exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.log.name} did not answer within {timeout_s}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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


def load_process(url: str, model: str, body: bytes, concurrency: int, started, stop, results) -> None:
    """A separate process keeping `concurrency` predicts in flight (asyncio) until `stop` is set."""
    import httpx

    async def run() -> tuple[int, int]:
        done = failed = 0
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=300, limits=limits, headers={"content-type": "application/json"}) as c:

            async def one() -> None:
                nonlocal done, failed
                while not stop.is_set():
                    r = await c.post(f"{url}/v1/models/{model}:predict", content=body)
                    done, failed = done + (r.status_code == 200), failed + (r.status_code != 200)

            started.set()
            await asyncio.gather(*(one() for _ in range(concurrency)))
        return done, failed

    results.put(asyncio.run(run()))


def health_under_load(args: argparse.Namespace, api_url: str, inference_url: str, model: str, body: bytes) -> dict:
    """/healthz latencies of both services while `--health-load` predicts run through the API."""
    import httpx

    ctx = multiprocessing.get_context("spawn")
    started, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=load_process, args=(api_url, model, body, args.health_load, started, stop, results))
    proc.start()
    latencies: dict[str, list[float]] = {"api": [], "inference": []}
    try:
        assert started.wait(60), "the load process did not start"
        time.sleep(1.0)  # every request in flight
        deadline = time.monotonic() + args.health_seconds
        with httpx.Client(timeout=30) as c:
            while time.monotonic() < deadline:
                for name, url in (("api", api_url), ("inference", inference_url)):
                    t0 = time.perf_counter()
                    assert c.get(f"{url}/healthz").status_code == 200
                    latencies[name].append(time.perf_counter() - t0)
                time.sleep(0.02)
    finally:
        stop.set()
        done, failed = results.get(timeout=300)
        proc.join(60)
    return {"latencies": latencies, "predicts": done, "failed": failed, "seconds": args.health_seconds}


# --------------------------------------------------------------------------------------------- the micro model


def register(store, model_id: str, out: dict, method: str, mode: str, backbone: str) -> None:
    """The model's record in Redis, as the train step writes it."""
    from storage.redis import now

    store.register_model(
        {
            "id": model_id,
            "object": "model",
            "created_at": now(),
            "job_id": f"job_{model_id}",
            "owner": None,
            "name": None,
            "method": method,
            "mode": mode,
            "backbone": backbone,
            "classes": out["manifest"].classes,
            "metrics": out["metrics"],
        }
    )


def micro_model(args: argparse.Namespace, settings, store) -> str:
    """A linear probe on test_vit from `args.dataset`, saved and registered; returns its id."""
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter
    from services.spec import JobSpec
    from storage.artifacts import ArtifactStore

    spec = JobSpec.model_validate(
        {
            "dataset": {"path": str(args.dataset)},
            "backbone": {"name": MICRO_BACKBONE, "pretrained": False},
            "method": {"name": "linear", "solver": "sgd"},
            "training": {"epochs": 1, "batch_size": 16},
        }
    )
    key = run_extraction(spec, settings, NullReporter())["cache_key"]
    out, _ = common.train_fresh(spec, settings, key, args.work / "ckpt")
    ArtifactStore.from_settings(settings).save_model(
        "model_bench_micro", out["weights"], out["manifest"], out["metrics"]
    )
    register(store, "model_bench_micro", out, "linear", "cache", MICRO_BACKBONE)
    return "model_bench_micro"


def png_bodies(dataset, count: int = 16) -> tuple[list[bytes], list[bytes]]:
    """`count` digits as PNG files, and each as a v1 predict body (JSON, base64)."""
    from PIL import Image

    from services.data.datasets import read_imagefolder

    pngs = []
    for path in read_imagefolder(dataset).paths[:count]:
        buf = io.BytesIO()
        Image.open(path).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    bodies = [json.dumps({"instances": [{"image_b64": base64.b64encode(b).decode()}]}).encode() for b in pngs]
    return pngs, bodies


def overhead(calls: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """Each call's latencies (s), `n` rounds of one call of each in turn: a burst of load elsewhere falls on every row
    alike, so their differences hold."""
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(n):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            out[name].append(time.perf_counter() - t0)
    return out


def http_calls(urls: dict[str, str], model_id: str, body: bytes) -> tuple[dict[str, Callable[[], object]], list]:
    """One keep-alive client per URL, each a call posting `body` to the model (a non-200 raises); and the clients,
    to close."""
    import httpx

    clients = []

    def call(url: str) -> Callable[[], object]:
        client = httpx.Client(timeout=300, headers={"content-type": "application/json"})
        clients.append(client)
        return lambda: client.post(f"{url}/v1/models/{model_id}:predict", content=body).raise_for_status()

    return {name: call(url) for name, url in urls.items()}, clients


# ------------------------------------------------------------------------------------------------- run alone


def micro_rows(args: argparse.Namespace, redis_url: str, n: int) -> dict[str, list[float]]:
    """The micro model's rows (s per request): in process, straight to its own inference service and through its own
    API, with one torch thread in them and in this process meanwhile. The forward of test_vit gains nothing from a
    second thread, and on a machine whose cores other processes use, OpenMP's spin-waiting between parallel regions
    makes a two-thread forward of a millisecond take tens: the milliseconds measured here would drown in it."""
    import torch

    from services.serving.inference import Predictor
    from storage.redis import JobStore

    settings = common.make_settings(args.work, args.work, args.device)
    pngs, bodies = png_bodies(args.dataset)
    model_id = micro_model(args, settings, JobStore.from_url(redis_url))
    one = argparse.Namespace(**{**vars(args), "threads": 1})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    services: list[Service] = []
    try:
        inference = Service(one, redis_url, "inference", "micro")
        api = Service(one, redis_url, "api", "micro", inference_url=inference.url)
        services = [inference, api]
        for service in services:
            service.wait()
        predictor = Predictor(settings)
        calls, clients = http_calls({"direct": inference.url, "api": api.url}, model_id, bodies[0])
        calls = {"inprocess": lambda: predictor.predict(model_id, pngs[:1]), **calls}
        overhead(calls, 5)  # warm: the model loaded everywhere
        rows = overhead(calls, n)
        for client in clients:
            client.close()
        return rows
    finally:
        torch.set_num_threads(threads)
        for service in services:
            service.stop()


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    from storage.redis_server import RedisServer
    from worker.launcher import free_port

    redis = RedisServer(args.work / "redis", free_port()).start()
    try:
        return micro_rows(args, redis.url, args.requests)
    finally:
        redis.stop()


def report(args: argparse.Namespace, rows: dict[str, list[float]]) -> None:
    p50 = {name: median(lat) * 1000 for name, lat in rows.items()}
    print(
        f"sidetune HTTP overhead: a linear probe on {MICRO_BACKBONE} (RANDOM INIT), device {args.device}, one 32x32 "
        f"PNG digit per request, {args.requests} requests per row interleaved request by request; one torch thread in "
        "the services and in this process"
    )
    print(common.machine_line(args.load_start))
    print()
    names = {
        "inprocess": "Predictor.predict in process (decode, transform, forward)",
        "direct": "HTTP straight to the inference service",
        "api": "HTTP through the API (forwarded)",
    }
    table = [
        [names[k], fmt(p50[k], 2), fmt(float(sorted(v)[int(0.9 * (len(v) - 1))]) * 1000, 2)] for k, v in rows.items()
    ]
    print(common.render(["row", "p50 ms", "p90 ms"], table))
    http_overhead, api_hop = p50["direct"] - p50["inprocess"], p50["api"] - p50["direct"]
    verdict = "met" if http_overhead <= TARGET_OVERHEAD_MS else "MISSED"
    print(f"\ntargets: http_overhead_ms {fmt(http_overhead, 2)} <= {TARGET_OVERHEAD_MS:g}: {verdict}")
    kv: dict[str, str] = {}
    for key, value in [
        ("http_overhead_ms", http_overhead),
        ("api_hop_ms", api_hop),
        ("inprocess_p50_ms", p50["inprocess"]),
        ("direct_p50_ms", p50["direct"]),
        ("api_p50_ms", p50["api"]),
    ]:
        common.put(kv, key, value, 2)
    kv |= {
        "backbone": MICRO_BACKBONE,
        "device": args.device,
        "torch_threads": "1",
        "wall_s": f"{time.perf_counter() - args.t_start:.0f}",
    }
    common.print_kv(kv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (the services' and the baseline's)")
    p.add_argument("--requests", type=int, default=200, help="requests per row")
    p.add_argument("--train-images", type=int, default=40, help="digits the micro model is trained on")
    p.add_argument("--data-dir", help="working dir (default: a temporary dir, removed after)")
    args = common.parse_with_smoke(p, argv, {"requests": 20, "train_images": 40})
    args.t_start, args.load_start = time.perf_counter(), common.load_average()
    with common.workdir(args.data_dir, "sidetune-bench-http-") as work:
        args.work = work
        args.dataset = common.digits_dir(work)
        common.write_digits(work, args.train_images)
        report(args, measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
