"""bench/serve_http.py --smoke for seconds: the micro model's rows (in process, straight to the inference service,
through the API) and the headline keys of the last line as numbers."""

from __future__ import annotations

from pathlib import Path

from tests.bench.smoke import run_smoke


def test_the_http_overhead_bench_runs_its_rows(tmp_path: Path) -> None:
    run = run_smoke("serve_http.py", "--data-dir", str(tmp_path))
    figures = run.numbers("http_overhead_ms", "api_hop_ms", "inprocess_p50_ms", "direct_p50_ms", "api_p50_ms")
    assert all(figures[k] > 0 for k in ("inprocess_p50_ms", "direct_p50_ms", "api_p50_ms")), figures
    assert run.kv["backbone"] == "test_vit" and run.kv["torch_threads"] == "1", run.kv
    assert sum(line.startswith(("Predictor.predict", "HTTP straight", "HTTP through")) for line in run.lines) == 3
