"""bench/heldout.py --smoke for seconds (the full table is run by hand): every row trains with its defaults on a
held-out split and the last line carries every figure."""

from __future__ import annotations

from pathlib import Path

from tests.bench.smoke import run_smoke

KEYS = (
    "probe_vs_gridsearch_32",
    "probe_vs_gridsearch_min_32",
    "losa_vs_probe_32",
    "probe_speedup_32",
    "auto_lr_cost_32",
    "auto_vs_best_32",
    "auto_cost_32",
    "video_losa_test",
)
ROWS = ("sidetune linear", "scikit-learn GridSearchCV", "LoSA (defaults)", "LoSA (one rate)", "auto", "video: LoSA")


def test_the_held_out_bench_runs_every_row(tmp_path: Path) -> None:
    run = run_smoke("heldout.py", "--data-dir", str(tmp_path))
    assert set(run.kv) == {*KEYS, "device"}, run.kv
    figures = run.numbers(*KEYS)
    assert abs(figures["probe_vs_gridsearch_32"]) < 100 and figures["probe_speedup_32"] > 0
    assert figures["auto_lr_cost_32"] > 0 and 0 <= figures["video_losa_test"] <= 1
    for row in ROWS:
        assert any(row in line for line in run.lines), run.stdout
