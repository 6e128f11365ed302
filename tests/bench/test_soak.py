"""bench/soak.py for seconds (the hour is run by hand): the real stack starts, load flows, a process is killed and
followed by its role under its new pid, every process is sampled per window, and the report ends with its verdict
and `key=value` line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("api", "inference", "extract-worker", "train-worker", "redis")


def test_a_short_soak_samples_every_process_and_follows_a_killed_one(tmp_path: Path) -> None:
    args = [
        "--minutes",
        "0.24",
        "--window-minutes",
        "0.08",
        "--sample-s",
        "1",
        "--kill-every",
        "0.12",
        "--backbone",
        "test_vit",
        "--image-size",
        "0",
        "--images",
        "40",
        "--bound-pct",
        "1000",
        "--data-dir",
        str(tmp_path),
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "bench/soak.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    kv = dict(pair.split("=", 1) for pair in lines[-1].split())
    assert kv["windows"] == "3" and kv["kills"] == "1" and kv["pass"] == "1", kv
    assert any(line.startswith("PASS: every process within max(1000%, 5 MB) RSS") for line in lines)
    table = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in ROLES}
    assert set(table) == set(ROLES), r.stdout
    assert table["train-worker"][-1] == "2", r.stdout  # killed once: sampled under its first pid and its next
    assert "killed train-worker" in r.stderr and "train-worker restarted" in r.stderr
