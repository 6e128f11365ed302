"""bench/video.py --smoke: motion videos through a ViViT of a tiny ViT, every extraction stage, the cache's bytes per
clip and LoSA from the cache against online; the last line carries every headline figure."""

from __future__ import annotations

from tests.bench.smoke import run_smoke

HEADLINE = ("extract_clips_per_s", "forward_clips_per_s", "extract_vs_forward", "bytes_per_clip", "train_speedup")


def test_the_video_bench_measures_every_headline_figure() -> None:
    run = run_smoke("video.py")
    figures = run.numbers(*HEADLINE, "decode_clips_per_s", "writer_clips_per_s", "pipeline_efficiency")
    assert all(value > 0 for value in figures.values()), figures
    assert 0 <= run.numbers("val_acc_cache")["val_acc_cache"] <= 1
    assert "(b) bytes per clip" in run.stdout
