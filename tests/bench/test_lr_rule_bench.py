"""bench/lr_rule.py for seconds (the full table is run by hand): one small cell, every column and the last line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_lr_rule_bench_runs_a_cell(tmp_path: Path) -> None:
    args = [
        "--limits",
        "100",
        "--batches",
        "32",
        "--size",
        "32",
        "--epochs",
        "4",
        "--backbone",
        "test_vit",
        "--data-dir",
        str(tmp_path),
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "bench/lr_rule.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    kv = dict(pair.split("=", 1) for pair in lines[-1].split())
    assert set(kv) == {"best_in_grid", "default_vs_wide", "device"}, kv
    assert 0 <= float(kv["best_in_grid"]) <= 1 and abs(float(kv["default_vs_wide"])) <= 100
    row = next(line for line in lines if line.strip().startswith("100"))
    assert "0.01768-0.1414" in row, row  # the grid at batch 32: 0.1 x sqrt(32 / 64) x 0.25 .. 2
