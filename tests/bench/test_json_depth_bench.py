"""bench/json_depth.py on half a megabyte: every body kind is counted (none too deep) and the last line is its
`key=value` figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_depth_bench_runs_on_small_bodies() -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "bench/json_depth.py", "--mb", "0.5", "--repeats", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    kv = dict(pair.split("=", 1) for pair in r.stdout.strip().splitlines()[-1].split())
    assert set(kv) == {
        "depth_ms_v1_base64_images",
        "depth_ms_v2_nested_pixels",
        "depth_ms_short_strings",
        "depth_ms_backslashes",
        "depth_ms_max",
    }
    assert all(float(v) >= 0 for v in kv.values())
