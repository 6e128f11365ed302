"""bench/lr_rule.py --smoke for seconds (the full table is run by hand): one small cell, every column and the last
line."""

from __future__ import annotations

from pathlib import Path

from tests.bench.smoke import run_smoke


def test_the_lr_rule_bench_runs_a_cell(tmp_path: Path) -> None:
    run = run_smoke("lr_rule.py", "--data-dir", str(tmp_path))
    assert set(run.kv) == {"best_in_grid", "default_vs_wide", "device"}, run.kv
    figures = run.numbers("best_in_grid", "default_vs_wide")
    assert 0 <= figures["best_in_grid"] <= 1 and abs(figures["default_vs_wide"]) <= 100
    row = next(line for line in run.lines if line.strip().startswith("100"))
    assert "0.01768-0.1414" in row, row  # the grid at batch 32: 0.1 x sqrt(32 / 64) x 0.25 .. 2
