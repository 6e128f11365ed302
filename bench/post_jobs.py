"""What `POST /jobs` costs on a large dataset, now that the request reads no dataset (the plan step does, in a
worker): the API under uvicorn on an embedded Redis, a CSV manifest of `--rows` rows (1,000,000 by default), and
`--repeats` submissions of a job on it, each timed from request to answer. No worker runs: the plan steps wait in the
broker, as they would behind a busy extract queue.

    python bench/post_jobs.py [--rows 1000000] [--repeats 20]
    python bench/post_jobs.py --smoke      # 2,000 rows, 3 submissions (the smoke test)

The rows repeat a few hundred real images (the digits), so the manifest is what a large object-store manifest is to
the request (a file whose rows it never reads); planning it is the plan step's and the dry run's business.
Ends with `post_jobs_ms=<median> post_jobs_max_ms=<max>` (the issue's target: under 200 ms at 1,000,000 rows).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

from common import fmt, parse_with_smoke, print_kv, put, render, say, workdir, write_digits

from api.main import create_app
from storage.redis_server import RedisServer
from storage.settings import Settings
from worker.launcher import free_port


def write_manifest(work: Path, rows: int) -> Path:
    """A CSV manifest of `rows` rows over the digits' training images, written in blocks."""
    write_digits(work, limit=300)
    root = work / "datasets" / "digits"
    images = sorted((root / "train").glob("*/*.png"))
    lines = [f"{p.relative_to(root)},{p.parent.name}\n" for p in images]
    manifest = root / "big.csv"
    with manifest.open("w") as f:
        f.write("path,label\n")
        for start in range(0, rows, len(lines)):
            f.writelines(lines[: min(len(lines), rows - start)])
    return manifest


def serve(app) -> tuple[str, object, threading.Thread]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


def submit_times(url: str, manifest: Path, repeats: int) -> list[float]:
    """Seconds of each `POST /jobs` (one warm-up first, not counted); every answer must be 201 `planning`."""
    import httpx

    body = {
        "dataset": {"path": str(manifest)},
        "backbone": {"name": "test_vit", "pretrained": False},
        "method": {"name": "linear"},
    }
    times = []
    with httpx.Client(timeout=120) as client:
        for i in range(repeats + 1):
            start = time.perf_counter()
            r = client.post(f"{url}/jobs", json=body)
            elapsed = time.perf_counter() - start
            if r.status_code != 201 or r.json()["status"] != "planning":
                raise RuntimeError(f"POST /jobs answered {r.status_code}: {r.text[:500]}")
            if i:
                times.append(elapsed)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the CSV manifest")
    p.add_argument("--repeats", type=int, default=20, help="submissions timed")
    p.add_argument("--data-dir", help="working dir (default: a temporary dir, removed after)")
    args = parse_with_smoke(p, argv, {"rows": 2000, "repeats": 3})
    with workdir(args.data_dir, "sidetune-post-jobs-") as work:
        start = time.perf_counter()
        manifest = write_manifest(work, args.rows)
        size_mb, took = manifest.stat().st_size / 1e6, time.perf_counter() - start
        say(f"manifest: {args.rows:,} rows, {size_mb:.2f} MB in {took:.1f}s")
        redis = RedisServer(work / "redis", free_port()).start()
        try:
            settings = Settings(data_dir=work, redis_url=redis.url, allowed_roots=[work / "datasets"])
            url, server, thread = serve(create_app(settings))
            try:
                times = submit_times(url, manifest, args.repeats)
            finally:
                server.should_exit = True
                thread.join(timeout=30)
        finally:
            redis.stop()
    ms = [t * 1000 for t in times]
    median, worst = statistics.median(ms), max(ms)
    row = [f"{args.rows:,}", str(len(ms)), fmt(median), fmt(worst)]
    print(render(["rows", "submissions", "median ms", "max ms"], [row]))
    kv: dict[str, str] = {}
    put(kv, "post_jobs_ms", median, 1)
    put(kv, "post_jobs_max_ms", worst, 1)
    print_kv(kv)


if __name__ == "__main__":
    main()
