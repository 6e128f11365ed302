"""bench/soak.py --smoke for seconds (the hour is run by hand): the real stack starts, load flows, a process is killed
and followed by its role under its new pid, every process is sampled per window, and the report ends with its verdict
and `key=value` line."""

from __future__ import annotations

from pathlib import Path

from tests.bench.smoke import run_smoke

ROLES = ("api", "inference", "extract-worker", "train-worker", "redis")


def test_a_short_soak_samples_every_process_and_follows_a_killed_one(tmp_path: Path) -> None:
    run = run_smoke("soak.py", "--data-dir", str(tmp_path))
    kv, lines = run.kv, run.lines
    assert kv["windows"] == "3" and kv["kills"] == "1" and kv["pass"] == "1", kv
    run.numbers("max_rss_growth_pct", "max_fd_growth", "jobs_succeeded", "predicts")
    assert any(line.startswith("PASS: every process within max(1000%, 5 MB) RSS") for line in lines)
    table = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in ROLES}
    assert set(table) == set(ROLES), run.stdout
    assert table["train-worker"][-1] == "2", run.stdout  # killed once: sampled under its first pid and its next
    assert "killed train-worker" in run.stderr and "train-worker restarted" in run.stderr
