"""storage/logs.py: the JSON log holds only JSON lines, even for what Python writes to stderr on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_an_exception_python_ignores_is_one_json_line_not_a_raw_traceback() -> None:
    """A finalizer that raises (CPython prints 'Exception ignored in: ...' and a traceback to stderr, e.g. a
    WeakKeyDictionary callback while a worker exits) must not break a JSON log: every line stays one JSON object."""
    code = (
        "from storage.logs import configure_logging\n"
        "configure_logging()\n"
        "class Finalizer:\n"
        "    def __del__(self):\n"
        "        raise RuntimeError('raised in a finalizer')\n"
        "x = Finalizer()\n"
        "del x\n"
        "import logging; logging.getLogger('t').info('after')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stderr.splitlines() if line.strip()]
    assert any("raised in a finalizer" in rec["message"] and rec["level"] == "warning" for rec in records), records
    assert records[-1]["message"] == "after"
