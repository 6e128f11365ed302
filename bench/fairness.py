"""Fairness between API keys on the real stack: key A queues a backlog of tiny jobs, then key B submits one. How long
B's job waits (queued -> started, and queued -> training started) and how many of A's jobs start before it.

    python bench/fairness.py                       # its own stack (Redis, workers, API; two keys); A queues 40 jobs
    python bench/fairness.py --jobs 4 --api http://127.0.0.1:8000 --key-a KEY_A --key-b KEY_B   # a running API
    python bench/fairness.py --smoke               # A queues one job, cancelled once B's is done (the smoke test)

The jobs are linear probes (one epoch of SGD) of `test_vit` at 32 px on ~150 digits; a first job of A's extracts their
feature cache, so every job after it is a cache hit: an extract step and a train step of a few seconds at most. Strict
FIFO makes B's job wait for A's whole backlog at each step; fair scheduling (worker/celery_app.py) for about one job of
A's per step.
The last line: `b_wait_s` (queued -> started), `b_train_wait_s` (queued -> training started), `b_done_s` (queued ->
succeeded), `a_started_ahead` and `a_trained_ahead` (A's jobs that started, or started training, after B was
submitted and before B did), `jobs` (A's backlog).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common


def spec(data: Path, image_size: int) -> dict:
    return {
        "dataset": {"path": str(data)},
        "backbone": {"name": "test_vit", "pretrained": False, "image_size": image_size},
        "method": {"name": "linear", "solver": "sgd"},
        "training": {"epochs": 1},
    }


def times(client, job_id: str) -> dict:
    """When the job was submitted, started, started training and ended (None: it did not)."""
    job = client.job(job_id)
    trained = [e["created_at"] for e in client.events(job_id, limit=1000) if e["message"] == "training started"]
    return {
        "id": job_id,
        "status": job["status"],
        "created": job["created_at"],
        "started": job.get("started_at"),
        "trained": trained[0] if trained else None,
        "finished": job.get("finished_at"),
    }


def scenario(api: str, key_a: str, key_b: str, body: dict, jobs: int, cancel_rest: bool) -> dict:
    """Run the scenario against a running API; returns B's job's times and A's backlog's."""
    from worker.client import Client

    a, b = Client(api, key_a), Client(api, key_b)
    warm = a.wait(a.submit(body)["id"], timeout_s=600)  # the cache entry: every job after it is a cache hit
    if warm["status"] != "succeeded":
        raise RuntimeError(f"the warm-up job {warm['status']}: {warm['error']}")
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        backlog = list(pool.map(lambda _: a.submit(body)["id"], range(jobs)))
    common.say(f"A queued {jobs} jobs in {time.monotonic() - t0:.1f} s; B submits one")
    b_job = b.wait(b.submit(body)["id"], timeout_s=3600, poll_s=0.2)
    if b_job["status"] != "succeeded":
        raise RuntimeError(f"B's job {b_job['status']}: {b_job['error']}")
    if cancel_rest:
        for job_id in backlog:
            a.cancel(job_id)
    for job_id in backlog:
        a.wait(job_id, timeout_s=3600)
    return {"b": times(b, b_job["id"]), "a": [times(a, job_id) for job_id in backlog]}


def figures(run: dict) -> dict:
    b = run["b"]

    def ahead(key: str) -> int:  # A's jobs that reached `key` after B was submitted and before B did
        return sum(1 for j in run["a"] if j[key] is not None and b["created"] < j[key] < b[key])

    ends = [j["finished"] for j in run["a"] if j["status"] == "succeeded"]
    return {
        "b_wait_s": b["started"] - b["created"],
        "b_train_wait_s": b["trained"] - b["created"],
        "b_done_s": b["finished"] - b["created"],
        "a_started_ahead": ahead("started"),
        "a_trained_ahead": ahead("trained"),
        "a_succeeded": len(ends),
        "a_drain_s": max(ends) - b["created"] if ends else None,
    }


def own_stack(work: Path, keys: tuple[str, str]):
    from storage.settings import Settings
    from worker.launcher import Stack, free_port

    common.write_digits(work, limit=150)
    settings = Settings(
        data_dir=work,
        embedded_redis_port=free_port(),
        api_port=free_port(),
        inference_port=free_port(),
        device="cpu",
        api_keys=list(keys),
    )
    return Stack(settings)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=40, help="A's backlog (default 40, as the hostile trial queued)")
    p.add_argument("--api", help="a running API (default: start a stack of its own)")
    p.add_argument("--key-a", default="bench-key-a")
    p.add_argument("--key-b", default="bench-key-b")
    p.add_argument("--data", help="with --api: the ImageFolder the jobs train on (under its allowed roots)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--cancel-rest", action="store_true", help="cancel A's backlog once B's job is done")
    p.add_argument("--data-dir", help="the stack's data dir (default: a temporary one)")
    # --smoke: A's backlog is one job, cancelled once B's is done (against --api, or a stack of its own)
    args = common.parse_with_smoke(p, argv, {"jobs": 1, "cancel_rest": True})
    load = common.load_average()
    if args.api:
        if not args.data:
            sys.exit("--api needs --data")
        run = scenario(
            args.api, args.key_a, args.key_b, spec(Path(args.data), args.image_size), args.jobs, args.cancel_rest
        )
    else:
        with common.workdir(args.data_dir, "fairness-") as work, own_stack(work, (args.key_a, args.key_b)) as stack:
            body = spec(common.digits_dir(work), args.image_size)
            run = scenario(stack.api_url, args.key_a, args.key_b, body, args.jobs, args.cancel_rest)
    f = figures(run)
    rows = [
        ["B's job: queued -> started", common.fmt(f["b_wait_s"], 2), str(f["a_started_ahead"])],
        ["B's job: queued -> training started", common.fmt(f["b_train_wait_s"], 2), str(f["a_trained_ahead"])],
        ["B's job: queued -> succeeded", common.fmt(f["b_done_s"], 2), "-"],
        [f"A's backlog: {f['a_succeeded']} of {args.jobs} succeeded", common.fmt(f["a_drain_s"], 2), "-"],
    ]
    print(common.render(["after B submitted", "seconds", "A's jobs ahead"], rows))
    print(
        f"A queued {args.jobs} jobs, then B one; load average {load:.2f} at the start, "
        f"{common.load_average():.2f} at the end"
    )
    kv: dict[str, str] = {}
    for key in ("b_wait_s", "b_train_wait_s", "b_done_s"):
        common.put(kv, key, f[key], 2)
    kv |= {
        "a_started_ahead": str(f["a_started_ahead"]),
        "a_trained_ahead": str(f["a_trained_ahead"]),
        "jobs": str(args.jobs),
    }
    common.print_kv(kv)


if __name__ == "__main__":
    main()
