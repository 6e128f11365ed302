"""bench/post_jobs.py --smoke: a 2,000-row manifest, three submissions answered `planning`, and the last line its
`key=value` figures (latency is the benchmark's to report, not a test's to assert)."""

from __future__ import annotations

from tests.bench.smoke import run_smoke


def test_the_post_jobs_bench_runs_on_a_small_manifest() -> None:
    run = run_smoke("post_jobs.py", timeout=180)
    assert set(run.kv) == {"post_jobs_ms", "post_jobs_max_ms"}
    figures = run.numbers("post_jobs_ms", "post_jobs_max_ms")
    assert 0 < figures["post_jobs_ms"] <= figures["post_jobs_max_ms"]
    assert "2,000" in run.stdout
