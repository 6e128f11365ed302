"""bench/sweep.py --smoke: both caches extracted, every row (linear heads, LoSA, LoSA streamed) trained by one job
each, and the last line carries every ratio."""

from __future__ import annotations

from tests.bench.smoke import run_smoke

HEADLINE = ("sweep_linear_32_vs_1", "sweep_losa_8_vs_1")


def test_the_sweep_bench_trains_every_row() -> None:
    run = run_smoke("sweep.py")
    ratios = run.numbers(*HEADLINE, "sweep_linear_8_vs_1", "sweep_losa_4_vs_1", "sweep_losa_streamed_8_vs_1")
    assert all(value > 0 for value in ratios.values()), ratios
    assert list(run.kv)[:2] == list(HEADLINE)
    assert any(line.startswith("losa-streamed") for line in run.lines), run.stdout
