"""The soak: the `sidetune serve` topology as processes (embedded Redis, extract worker, train worker, inference
service, API; worker.launcher.Stack, supervised), jobs and predicts kept flowing through its HTTP API for
`--minutes`, processes optionally killed on a schedule, and every process's RSS and open file descriptors sampled
(psutil) every `--sample-s` seconds, following a restarted process by its role. Not in CI
(tests/bench/test_soak_bench.py runs it for seconds).

    python bench/soak.py --minutes 60                 # the hour: six 10-minute windows
    python bench/soak.py --minutes 60 --kill-every 10  # and one process SIGKILLed every 10 minutes, in turn
    python bench/soak.py --smoke                      # 15 seconds, one kill (the smoke test)

The load: one job at a time, alternating a linear probe from the feature cache (its backbone seed cycles through
`--seeds` values, and the cache quota holds fewer entries than that, so every job extracts and evicts as well) and a
LoSA job in online mode (the backbone runs in the train worker); finished jobs beyond the last three are deleted with
their models. Predicts: `--predict-rate` requests a second over the API, v1 (base64 images) and v2 (JSON and binary
tensors) in turn, on the models kept.

The report: per window, each process's RSS (the median of the window's second half: the first half of the first
window is warm-up) and open descriptors, their growth over the first window, and the RSS growth from the second
window to the last (whether it still grows after the warm-up). It passes when no process's RSS in any later window is
more than `--bound-pct` (or `--rss-slack-mb`, whichever is more) above its first window's and no process holds more
than `--bound-pct` (or `--fd-slack`, whichever is more) more descriptors. The last line is `key=value` pairs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from common import ROOT, fmt, parse_with_smoke, print_kv, put, render, say, workdir

from storage.settings import Settings
from worker.launcher import Stack, free_port

ROLES = ("api", "inference", "extract-worker", "train-worker", "redis")
KILL_ORDER = ("train-worker", "extract-worker", "inference", "api", "redis")
KEEP_MODELS = 3


@dataclass
class Sample:
    t: float  # seconds since the soak started
    role: str
    pid: int
    rss: int
    fds: int
    children: int


class Sampler:
    """RSS, open descriptors and child processes of each role's current process (a restarted one has a new pid)."""

    def __init__(self, stack: Stack) -> None:
        self.stack, self.samples = stack, []

    def pids(self) -> dict[str, int]:
        pids = {name: proc.pid for name, proc in self.stack.procs.items()}
        redis = self.stack.redis
        if redis is not None and redis.process is not None:
            pids["redis"] = redis.process.pid
        return pids

    def sample(self, t: float) -> None:
        for role, pid in self.pids().items():
            try:
                proc = psutil.Process(pid)
                with proc.oneshot():
                    sample = Sample(t, role, pid, proc.memory_info().rss, proc.num_fds(), len(proc.children(True)))
            except psutil.Error:  # exited between the listing and the read: the supervisor restarts it
                continue
            self.samples.append(sample)


class Killer:
    """SIGKILLs one process every `every_s`, the roles in turn (the supervisor starts each again)."""

    def __init__(self, stack: Stack, every_s: float) -> None:
        self.stack, self.every_s, self.kills = stack, every_s, []
        self.next_at = every_s

    def tick(self, t: float, pids: dict[str, int]) -> None:
        if not self.every_s or t < self.next_at:
            return
        role = KILL_ORDER[len(self.kills) % len(KILL_ORDER)]
        self.next_at += self.every_s
        with contextlib.suppress(ProcessLookupError, KeyError):
            psutil.Process(pids[role]).send_signal(signal.SIGKILL)
            self.kills.append((t, role, pids[role]))
            say(f"{t / 60:5.1f} min: killed {role} (pid {pids[role]})")


class Load:
    """Jobs one at a time and paced predicts, through the API, each in a thread; counts what came back."""

    def __init__(self, url: str, args: argparse.Namespace, train: Path, images: list[bytes]) -> None:
        self.url, self.args, self.train, self.images = url, args, train, images
        self.stop = threading.Event()
        self.models: list[tuple[str, str]] = []  # (model id, job id), oldest first
        self.jobs: Counter[str] = Counter()
        self.predicts: Counter[str] = Counter()
        self.errors: list[str] = []  # the first 5xx answers and refusals, to say what they were
        self.threads = [threading.Thread(target=fn, daemon=True) for fn in (self._jobs, self._predicts)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def _spec(self, i: int) -> dict:
        backbone = {"name": self.args.backbone, "pretrained": False, "init_seed": (i // 2) % self.args.seeds}
        if self.args.image_size:
            backbone["image_size"] = self.args.image_size
        spec = {"dataset": {"path": str(self.train)}, "backbone": backbone, "training": {"epochs": 2}}
        if i % 2 == 0:
            return {**spec, "method": {"name": "linear"}}
        return {
            **spec,
            "backbone": {**backbone, "init_seed": 0},
            "method": {"name": "losa", "rank": 4},
            "execution": {"mode": "online"},
            "training": {"epochs": 1, "batch_size": 32},
        }

    def _note(self, what: str, r: httpx.Response) -> None:
        if len(self.errors) < 20:
            self.errors.append(f"{what}: {r.status_code} {r.text[:200]}")

    def _jobs(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            i = 0
            while not self.stop.is_set():
                try:
                    r = client.post("/jobs", json=self._spec(i))
                except httpx.HTTPError:  # the API is restarting
                    self.jobs["submit_unreachable"] += 1
                    self.stop.wait(2)
                    continue
                if r.status_code != 201:
                    self.jobs[f"submit_{r.status_code}"] += 1
                    self._note("POST /jobs", r)
                    self.stop.wait(2)
                    continue
                i += 1
                job = self._wait(client, r.json()["id"])
                self.jobs[job.get("status", "unknown")] += 1
                if job.get("status") == "failed":
                    self.errors.append(f"job {job['id']} failed: {job.get('error')}")
                if job.get("status") == "succeeded":
                    self.models.append((job["model_id"], job["id"]))
                while len(self.models) > KEEP_MODELS:
                    model_id, job_id = self.models.pop(0)
                    with contextlib.suppress(httpx.HTTPError):
                        client.delete(f"/models/{model_id}")
                        client.delete(f"/jobs/{job_id}")

    def _wait(self, client: httpx.Client, job_id: str) -> dict:
        while not self.stop.wait(1):
            try:
                r = client.get(f"/jobs/{job_id}")
            except httpx.HTTPError:
                continue
            if r.status_code == 200 and r.json()["status"] in ("succeeded", "failed", "cancelled"):
                return r.json()
        return {"id": job_id, "status": "unfinished"}

    def _predicts(self) -> None:
        blobs = [base64.b64encode(b).decode() for b in self.images]
        n = 0
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self.stop.wait(1 / self.args.predict_rate):
                if not self.models:
                    continue
                model_id = self.models[-1 - n % len(self.models)][0]
                some = blobs[n % len(blobs) :][:4] or blobs[:4]
                kind = ("v1", "v2 json", "v2 binary")[n % 3]
                n += 1
                try:
                    r = self._predict(client, kind, model_id, some)
                except httpx.HTTPError:
                    self.predicts["unreachable"] += 1
                    continue
                self.predicts[str(r.status_code)] += 1
                if r.status_code >= 500 or r.status_code in (400, 422):
                    self._note(f"{kind} predict", r)

    @staticmethod
    def _predict(client: httpx.Client, kind: str, model_id: str, blobs: list[str]) -> httpx.Response:
        if kind == "v1":
            return client.post(f"/v1/models/{model_id}:predict", json={"instances": [{"image_b64": b} for b in blobs]})
        if kind == "v2 json":
            body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(blobs)], "data": blobs}]}
            return client.post(f"/v2/models/{model_id}/infer", json=body)
        raw = b"".join(len(d).to_bytes(4, "little") + d for d in map(base64.b64decode, blobs))
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [len(blobs)],
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ]
            }
        ).encode()
        return client.post(
            f"/v2/models/{model_id}/infer",
            content=head + raw,
            headers={"Inference-Header-Content-Length": str(len(head))},
        )


def linear_cache_bytes(train: Path, args: argparse.Namespace, data: Path) -> int:
    """What one linear probe's cache entry takes, from `sidetune plan` (its own process: torch stays out of this one,
    which samples the others)."""
    spec = {
        "dataset": {"path": str(train)},
        "backbone": {"name": args.backbone, "pretrained": False},
        "method": {"name": "linear"},
    }
    if args.image_size:
        spec["backbone"]["image_size"] = args.image_size
    path = data.parent / "plan.json"
    path.write_text(json.dumps(spec))
    env = {"SIDETUNE_DATA_DIR": str(data), "SIDETUNE_ALLOWED_ROOTS": str(train.parent), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "plan", str(path), "--json"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    return json.loads(out.stdout)["cache_bytes"]


def windows(samples: list[Sample], window_s: float, count: int) -> dict[str, list[dict]]:
    """Per role, per window: the median RSS and descriptors of the window's second half, its pids and children."""
    out: dict[str, list[dict]] = {}
    for role in ROLES:
        rows = []
        for w in range(count):
            start, end = w * window_s, (w + 1) * window_s
            mine = [s for s in samples if s.role == role and start <= s.t < end]
            settled = [s for s in mine if s.t >= start + window_s / 2] or mine
            if not settled:
                rows.append({})
                continue
            rows.append(
                {
                    "rss": statistics.median(s.rss for s in settled),
                    "fds": statistics.median(s.fds for s in settled),
                    "children": max(s.children for s in mine),
                    "pids": sorted({s.pid for s in mine}),
                }
            )
        out[role] = rows
    return out


def _pct(a: float, b: float) -> float:
    return 100 * (a / b - 1)


def report(per_role: dict[str, list[dict]], args: argparse.Namespace, load: Load, kills: list) -> dict[str, str]:
    """Prints the table, the load's counts and the verdict; returns the `key=value` pairs."""
    count = len(per_role[ROLES[0]])
    headers = [
        "process",
        *(f"w{w + 1} RSS MB" for w in range(count)),
        "max growth %",
        "w2 to last %",
        "fds w1",
        "fds last",
        "children last",
        "pids",
    ]
    rows, failures = [], []
    worst_rss, worst_fd = (0.0, "none"), (0.0, "none")
    for role, ws in per_role.items():
        seen = [w for w in ws if w]
        if not ws[0] or not seen:
            continue
        base, last = ws[0], seen[-1]
        most = max((_pct(w["rss"], base["rss"]) for w in seen[1:]), default=0.0)
        later = _pct(last["rss"], seen[1]["rss"]) if len(seen) > 2 else 0.0  # after the warm-up: still growing?
        fd_most = max((w["fds"] - base["fds"] for w in seen[1:]), default=0.0)
        cells = [
            f"{w['rss'] / 2**20:,.1f}" + (f" ({_pct(w['rss'], base['rss']):+.1f}%)" if i else "") if w else "-"
            for i, w in enumerate(ws)
        ]
        pids = {p for w in seen for p in w["pids"]}
        rows.append(
            [
                role,
                *cells,
                fmt(most),
                fmt(later),
                fmt(base["fds"], 0),
                fmt(last["fds"], 0),
                str(last["children"]),
                str(len(pids)),
            ]
        )
        worst_rss, worst_fd = max(worst_rss, (most, role)), max(worst_fd, (fd_most, role))
        if most > args.bound_pct and max(w["rss"] - base["rss"] for w in seen) > args.rss_slack_mb * 2**20:
            failures.append(f"{role} RSS grew {most:.1f}%")
        if fd_most > max(args.bound_pct / 100 * base["fds"], args.fd_slack):
            failures.append(f"{role} holds {fd_most:.0f} more descriptors")
    print(render(headers, rows))
    print(
        f"RSS and descriptors: the median of each window's second half ({args.window_minutes:g} min windows); "
        f"growth against window 1. Jobs: {dict(load.jobs)}. Predicts by status: {dict(load.predicts)}. Kills "
        f"(minute, process): {[(round(t / 60, 1), role) for t, role, _ in kills]}."
    )
    for line in load.errors[:10]:
        print(f"  {line}")
    verdict = (
        f"every process within max({args.bound_pct:g}%, {args.rss_slack_mb:g} MB) RSS and "
        f"max({args.bound_pct:g}%, {args.fd_slack}) descriptors of its first window"
    )
    print(f"PASS: {verdict}" if not failures else f"FAIL: {verdict}: not so for {'; '.join(failures)}")
    kv = {"minutes": f"{args.minutes:g}", "windows": str(count)}
    put(kv, "max_rss_growth_pct", worst_rss[0], 2)
    kv["max_rss_growth_process"] = worst_rss[1]
    put(kv, "max_fd_growth", worst_fd[0], 0)
    kv |= {
        "jobs_succeeded": str(load.jobs["succeeded"]),
        "jobs_failed": str(load.jobs["failed"]),
        "predicts": str(sum(load.predicts.values())),
        "predict_5xx": str(sum(n for code, n in load.predicts.items() if code.startswith("5"))),
        "predict_500": str(load.predicts["500"]),  # 503 with Retry-After is the answer while a process restarts
        "kills": str(len(kills)),
        "pass": str(int(not failures)),
    }
    return kv


# --smoke: 15 seconds in three windows, one kill, timm's 6-block test ViT on 40 digits; windows of 5 seconds say
# nothing about growth, so the bound is wide
SMOKE = {
    "minutes": 0.24,
    "window_minutes": 0.08,
    "sample_s": 1.0,
    "kill_every": 0.12,
    "backbone": "test_vit",
    "image_size": 0,
    "images": 40,
    "bound_pct": 1000.0,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="how long the load runs")
    p.add_argument("--window-minutes", type=float, default=10.0, help="report window")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--kill-every", type=float, default=0.0, help="minutes between kills (0: none)")
    p.add_argument("--bound-pct", type=float, default=5.0, help="most RSS growth over the first window, percent")
    p.add_argument(
        "--rss-slack-mb",
        type=float,
        default=5.0,
        help="RSS a process may gain whatever the percentage (Redis's is about 5 MB: a percentage of it is noise)",
    )
    p.add_argument("--fd-slack", type=int, default=10, help="descriptors a process may gain whatever the percentage")
    p.add_argument("--backbone", default="vit_tiny_patch16_224", help="timm ViT, random init")
    p.add_argument("--image-size", type=int, default=48, help="input size (0: the backbone's)")
    p.add_argument("--images", type=int, default=200, help="digits written (a tenth held out for predicts)")
    p.add_argument("--seeds", type=int, default=3, help="backbone seeds the linear probes cycle through")
    p.add_argument("--predict-rate", type=float, default=2.0, help="predict requests a second")
    p.add_argument("--data-dir", help="working dir (default: a temporary one, removed)")
    args = parse_with_smoke(p, argv, SMOKE)
    window_s, count = args.window_minutes * 60, max(1, round(args.minutes / args.window_minutes))

    with workdir(args.data_dir, "sidetune-soak-") as work:
        data, images_root = work / "data", work / "images"
        data.mkdir(exist_ok=True)
        from services.data.digits import write_digits

        write_digits(images_root, limit=args.images)
        train = images_root / "train"
        held_out = [path.read_bytes() for path in sorted((images_root / "holdout").glob("*/*.png"))]
        quota_gb = 2.5 * linear_cache_bytes(train, args, data) / 1e9  # fewer entries than seeds: evictions
        settings = Settings(
            data_dir=data,
            allowed_roots=[images_root],
            embedded_redis_port=free_port(),
            api_port=free_port(),
            inference_port=free_port(),
            device="cpu",
            cache_quota_gb=quota_gb,
        )
        say(f"starting the stack in {data} (cache quota {quota_gb * 1e9 / 1e3:.0f} kB)")
        with Stack(settings) as stack, Load(stack.api_url, args, train, held_out) as load:
            sampler, killer = Sampler(stack), Killer(stack, args.kill_every * 60)
            start = time.monotonic()
            say(f"soaking for {args.minutes:g} min: windows of {args.window_minutes:g} min")
            while (t := time.monotonic() - start) < count * window_s:
                sampler.sample(t)
                killer.tick(t, sampler.pids())
                time.sleep(max(0.0, args.sample_s - (time.monotonic() - start - t)))
        kv = report(windows(sampler.samples, window_s, count), args, load, killer.kills)
    print_kv(kv)
    return 0 if kv["pass"] == "1" else 1


if __name__ == "__main__":
    sys.exit(main())
