"""The services under test and the HTTP load of bench/serve.py: `sidetune api` and `sidetune inference` as
subprocesses, client threads driving predicts, and /healthz probed while a separate process keeps predicts in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import common


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
