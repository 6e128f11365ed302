"""bench/heldout.py for seconds (the full table is run by hand): every row trains with its defaults on a held-out
split and the last line carries every figure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_held_out_bench_runs_every_row(tmp_path: Path) -> None:
    args = [
        "--sizes",
        "32",
        "--seeds",
        "0",
        "--backbone",
        "test_vit",
        "--limit",
        "200",
        "--video-per-class",
        "4",
        "--data-dir",
        str(tmp_path),
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "bench/heldout.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    kv = dict(pair.split("=", 1) for pair in lines[-1].split())
    assert set(kv) == {
        "probe_vs_gridsearch_32",
        "probe_vs_gridsearch_min_32",
        "losa_vs_probe_32",
        "probe_speedup_32",
        "auto_lr_cost_32",
        "auto_vs_best_32",
        "auto_cost_32",
        "video_losa_test",
        "device",
    }, kv
    assert abs(float(kv["probe_vs_gridsearch_32"])) < 100 and float(kv["probe_speedup_32"]) > 0
    assert float(kv["auto_lr_cost_32"]) > 0 and 0 <= float(kv["video_losa_test"]) <= 1
    rows = ("sidetune linear", "scikit-learn GridSearchCV", "LoSA (defaults)", "LoSA (one rate)", "auto", "video: LoSA")
    for row in rows:
        assert any(row in line for line in lines), r.stdout
