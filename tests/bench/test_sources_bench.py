"""bench/sources.py --smoke: a 2,000-row manifest submitted and planned, and 24 photos extracted from every source
(WebDataset shards on a moto server among them), each source's cache entry bit-equal to the ImageFolder's; the last
line its `key=value` figures (speed and memory are the benchmark's to report, not a test's to assert)."""

from __future__ import annotations

from tests.bench.smoke import run_smoke


def test_the_sources_bench_runs_every_source_on_a_few_photos() -> None:
    run = run_smoke("sources.py", timeout=600)
    assert set(run.kv) == {"post_jobs_ms", "plan_peak_mb", "plan_s", "wds_s3_vs_local", "sources_equal"}
    figures = run.numbers("post_jobs_ms", "plan_peak_mb", "plan_s", "wds_s3_vs_local")
    assert all(v > 0 for v in figures.values())
    assert run.kv["sources_equal"] == "1", run.stdout
    for source in ("imagefolder", "csv", "jsonl", "wds local", "wds s3"):
        assert any(line.startswith(source) and line.endswith("yes") for line in run.lines), source
