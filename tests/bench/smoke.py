"""Running a bench script as its smoke test does: in a subprocess from the repository root, and reading the
`key=value` line that every script's output ends with."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Smoke:
    """A finished run: its output and the pairs of its last line (values as printed)."""

    stdout: str
    stderr: str
    kv: dict[str, str]

    @property
    def lines(self) -> list[str]:
        return self.stdout.strip().splitlines()

    def numbers(self, *keys: str) -> dict[str, float]:
        """The value of each key as a float; a key missing, not a number or not finite (`nan`: not measured) fails."""
        missing = [k for k in keys if k not in self.kv]
        assert not missing, f"missing from the last line: {missing}\n{self.kv}"
        out: dict[str, float] = {}
        for key in keys:
            try:
                out[key] = float(self.kv[key])
            except ValueError:
                raise AssertionError(f"{key}={self.kv[key]} is not a number") from None
            assert math.isfinite(out[key]), f"{key}={self.kv[key]} was not measured\n{self.stderr[-3000:]}"
        return out


def last_line(stdout: str) -> dict[str, str]:
    lines = stdout.strip().splitlines()
    return dict(pair.split("=", 1) for pair in lines[-1].split()) if lines else {}


def run_smoke(script: str, *args: str, timeout: float = 600, env: dict[str, str] | None = None) -> Smoke:
    """`python bench/<script> --smoke *args` with one torch thread (the flags given win over --smoke's); fails unless
    it exits 0."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"} | (env or {})
    r = subprocess.run(
        [sys.executable, f"bench/{script}", "--smoke", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return Smoke(r.stdout, r.stderr, last_line(r.stdout))
