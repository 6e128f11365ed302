"""bench/classes.py on 120 classes (above reports.LARGE_CLASSES, so the sparse report and the summary plot): every
stage runs in its child processes and the last line reports the peak RSS, the ratio and the plot's fixed canvas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_classes_bench_trains_reports_and_measures_120_classes(tmp_path: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [
            sys.executable,
            "bench/classes.py",
            "--classes",
            "120",
            "--full-solve",
            "0",
            "--large-max-iter",
            "3",
            "--data-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    kv = dict(pair.split("=", 1) for pair in r.stdout.strip().splitlines()[-1].split())
    assert kv["failed"] == "0" and kv["confusion_px_120"] == "1400x700"
    assert float(kv["extract_peak_rss_mb_120"]) > 0 and 0 < float(kv["peak_rss_mb_120"]) < 4096
    assert float(kv["rss_ratio_120"]) > 0 and float(kv["evaluation_kb_120"]) > 0
    assert "seconds per stage" in r.stdout and "peak RSS (MB)" in r.stdout
