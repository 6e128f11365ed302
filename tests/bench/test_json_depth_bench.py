"""bench/json_depth.py --smoke, on half a megabyte: every body kind is counted (none too deep) and the last line is
its `key=value` figures."""

from __future__ import annotations

from tests.bench.smoke import run_smoke

KEYS = (
    "depth_ms_v1_base64_images",
    "depth_ms_v2_nested_pixels",
    "depth_ms_short_strings",
    "depth_ms_backslashes",
    "depth_ms_max",
)


def test_the_depth_bench_runs_on_small_bodies() -> None:
    run = run_smoke("json_depth.py", timeout=120)
    assert set(run.kv) == set(KEYS)
    assert all(value >= 0 for value in run.numbers(*KEYS).values())
