"""bench/methods.py --smoke: a row of each execution mode (cache, online, images, tail) trains and predicts in its own
process (bench/methods_row.py) and the last line carries the ratios against full fine-tuning and each row's
accuracy."""

from __future__ import annotations

from tests.bench.smoke import run_smoke

HEADLINE = ("losa_vs_full_speed", "losa_vs_full_mem", "acc_losa", "acc_losa_online", "acc_full", "acc_lora_tail")


def test_the_methods_bench_runs_a_row_of_each_mode() -> None:
    run = run_smoke("methods.py")
    figures = run.numbers(*HEADLINE, "losa_cache_vs_online_speed", "losa_infer_vs_backbone", "mem_mb_lora_tail")
    assert figures["losa_vs_full_speed"] > 0 and figures["losa_vs_full_mem"] > 0
    assert all(0 <= figures[k] <= 1 for k in HEADLINE if k.startswith("acc_")), figures
    assert run.kv["failed"] == "none"
