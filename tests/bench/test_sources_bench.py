"""bench/sources.py --smoke: a 2,000-row manifest submitted and planned, as many items planned as an ImageFolder,
WebDataset shards and Hugging Face Parquet shards, and 24 photos extracted from every source (WebDataset shards, a
CSV manifest of the photos' URLs and Parquet shards on a moto server among them), each source's cache entry bit-equal
to the ImageFolder's; the last line its `key=value` figures (speed and memory are the benchmark's to report, not a
test's to assert)."""

from __future__ import annotations

import importlib.util

from tests.bench.smoke import run_smoke


def test_the_sources_bench_runs_every_source_on_a_few_photos() -> None:
    run = run_smoke("sources.py", timeout=600)
    per_format = {f"plan_{figure}_{name}" for figure in ("peak_mb", "s") for name in ("imagefolder", "wds", "hf")}
    assert set(run.kv) == {"post_jobs_ms", "plan_peak_mb", "plan_s", "wds_s3_vs_local", "sources_equal"} | per_format
    figures = run.numbers("post_jobs_ms", "plan_peak_mb", "plan_s", "wds_s3_vs_local", *sorted(per_format))
    assert all(v > 0 for v in figures.values())
    assert run.kv["sources_equal"] == "1", run.stdout
    sources = ["imagefolder", "csv", "jsonl", "wds local", "wds s3", "csv s3"]
    if importlib.util.find_spec("datasets") is not None:
        sources += ["hf parquet s3", "hf parquet", "hf save_to_disk"]
    for source in sources:
        assert any(line.startswith(f"{source} ") and line.endswith("yes") for line in run.lines), source
    for planned in ("csv", "imagefolder", "wds", "hf"):  # each planned the rows' count of items
        assert any(line.split()[:2] == [planned, "2,000"] for line in run.lines), planned
