"""bench/cache.py --smoke: every part (extraction stages and rows, reads, training speed, codecs, and the memory
children at batch size 1) runs on a tiny ViT and the last line carries every headline figure, measured."""

from __future__ import annotations

from pathlib import Path

from tests.bench.smoke import run_smoke

HEADLINE = (
    "pipeline_efficiency_photos",
    "pipeline_efficiency_digits",
    "extract_ratio",
    "writer_vs_disk",
    "train_speedup",
    "train_mem_ratio",
)


def test_the_cache_bench_measures_every_headline_figure(tmp_path: Path) -> None:
    run = run_smoke("cache.py", "--data-dir", str(tmp_path))
    figures = run.numbers(*HEADLINE, "read_mb_s", "cache_mem_mb", "online_mem_mb", "codec_acc_none")
    assert all(value > 0 for value in figures.values()), figures
    assert list(run.kv)[-len(HEADLINE) :] == list(HEADLINE)  # the headline last, in the order
    assert "FAILED" not in run.stderr
