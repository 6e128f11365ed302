"""bench/serve.py --smoke for about a minute (the full run is by hand): every row through the real services, the
memory of the models, the micro model's HTTP overhead, and the headline keys of the last line as numbers."""

from __future__ import annotations

from pathlib import Path

from tests.bench.smoke import run_smoke

HEADLINE = (
    "latency_ratio",
    "multi_model_cost_ratio",
    "health_p99_ms",
    "extra_model_mb_losa",
    "extra_model_mb_merged",
    "http_overhead_ms",
    "api_hop_ms",
    "backbone_mb",
    "bare_ms",
    "predict_p50_ms",
    "direct_p50_ms",
    "inprocess_p50_ms",
    "img_s_1_model",
    "img_s_multi_models",
    "batching_gain",
)


def test_the_serve_bench_runs_every_row(tmp_path: Path) -> None:
    run = run_smoke("serve.py", "--data-dir", str(tmp_path), timeout=900)
    figures = run.numbers(*HEADLINE)
    assert run.kv["failed"] == "0" and run.kv["backbone"] == "test_vit", run.kv
    assert figures["bare_ms"] > 0 and figures["img_s_1_model"] > 0
    assert any(line.startswith("micro model (test_vit, 1 thread): HTTP via the API") for line in run.lines)
