"""bench/classes.py --smoke, 120 classes (above reports.LARGE_CLASSES, so the sparse report and the summary plot):
every stage runs in its child processes and the last line reports the peak RSS, the ratio and the plot's fixed
canvas."""

from __future__ import annotations

from pathlib import Path

from tests.bench.smoke import run_smoke


def test_the_classes_bench_trains_reports_and_measures_120_classes(tmp_path: Path) -> None:
    run = run_smoke("classes.py", "--data-dir", str(tmp_path))
    kv = run.kv
    figures = run.numbers("peak_rss_mb_120", "extract_peak_rss_mb_120", "rss_ratio_120", "seconds_120")
    assert kv["failed"] == "0" and kv["confusion_px_120"] == "1400x700"
    assert figures["extract_peak_rss_mb_120"] > 0 and 0 < figures["peak_rss_mb_120"] < 4096
    assert figures["rss_ratio_120"] > 0 and run.numbers("evaluation_kb_120")["evaluation_kb_120"] > 0
    assert "seconds per stage" in run.stdout and "peak RSS (MB)" in run.stdout
