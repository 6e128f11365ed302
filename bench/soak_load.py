"""The soak's moving parts (bench/soak.py): a sampler of every process's RSS and descriptors, a killer that SIGKILLs
one process in turn, and the load (jobs and predicts through the HTTP API)."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from common import ROOT, say

from worker.launcher import Stack

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
