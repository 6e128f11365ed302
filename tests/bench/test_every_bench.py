"""Every bench entry point (a script with a `__main__`) takes `--smoke` and has its smoke test,
tests/bench/test_<name>_bench.py, that runs it through `run_smoke`; the modules its entry points import (common.py,
cache_extract.py, methods_row.py, ...) are covered by theirs."""

from __future__ import annotations

import pytest

from tests.bench.smoke import ROOT, Smoke, last_line

PENDING: set[str] = set()  # entry points whose smoke test is still to come


def entry_points() -> list[str]:
    return sorted(
        path.stem for path in (ROOT / "bench").glob("*.py") if 'if __name__ == "__main__":' in path.read_text()
    )


def test_every_bench_script_has_a_smoke_flag_and_test() -> None:
    names = entry_points()
    assert {"cache", "methods", "sweep", "video"} <= set(names), names
    for name in sorted(set(names) - PENDING):
        assert "parse_with_smoke(" in (ROOT / "bench" / f"{name}.py").read_text(), f"bench/{name}.py has no --smoke"
        test = ROOT / "tests" / "bench" / f"test_{name}_bench.py"
        assert test.exists(), f"bench/{name}.py has no smoke test {test.relative_to(ROOT)}"
        assert f'run_smoke("{name}.py"' in test.read_text(), f"{test.name} does not run bench/{name}.py --smoke"


def test_a_headline_key_missing_or_not_a_finite_number_fails() -> None:
    run = Smoke("table\n", "", last_line("table\na=1.5 b=nan c=none d=-2\n"))
    assert run.numbers("a", "d") == {"a": 1.5, "d": -2.0}
    for key in ("b", "c", "e"):
        with pytest.raises(AssertionError):
            run.numbers("a", key)
