"""bench/gpu.py, the one command prepared for a lent GPU machine, run on the CPU (`--device cpu --tiny`) so that it
cannot rot between the sessions that get a GPU: every phase ends and appends its `phase=` line of figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("env", "data", "extraction", "training", "serving")


def test_every_phase_of_the_gpu_bench_runs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.txt"
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "bench/gpu.py", "--device", "cpu", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = {
        line.split()[0].removeprefix("phase="): dict(kv.split("=", 1) for kv in line.split()[1:])
        for line in out.read_text().splitlines()
    }
    assert tuple(lines) == PHASES, lines.keys()
    assert float(lines["extraction"]["whole_img_s_digits"]) > 0
    assert float(lines["training"]["train_speedup"]) > 0
    assert float(lines["serving"]["latency_ratio"]) > 0
