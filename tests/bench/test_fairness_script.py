"""bench/fairness.py, small, against the session's keyed API (`keyed_api`), so that it cannot rot: it runs a backlog of
one job and B's one, prints its table and ends with its `key=value` line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TENANT_KEYS

ROOT = Path(__file__).resolve().parents[2]


def test_the_fairness_bench_runs_against_a_running_api(keyed_api) -> None:
    data = keyed_api.settings.data_path / "datasets" / "digits" / "train"
    args = [
        "--api",
        keyed_api.api_url,
        "--key-a",
        TENANT_KEYS["a"],
        "--key-b",
        TENANT_KEYS["b"],
        "--data",
        str(data),
        "--jobs",
        "1",
        "--cancel-rest",
    ]
    r = subprocess.run(
        [sys.executable, "bench/fairness.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["after", "B", "submitted"] and "B's job: queued -> started" in r.stdout
    figures = dict(kv.split("=", 1) for kv in lines[-1].split())
    assert set(figures) == {"b_wait_s", "b_train_wait_s", "b_done_s", "a_started_ahead", "a_trained_ahead", "jobs"}
    assert float(figures["b_wait_s"]) >= 0 and int(figures["a_started_ahead"]) <= 2 and figures["jobs"] == "1"
