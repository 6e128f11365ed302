"""An export's model card's loading code run as written (services/export/card_code.py): the python blocks of the card's
loading section, in the folder the export is unpacked to (a zip unzipped; the `onnx` graph under the name the service
gives it, its card the graph's `model_card` metadata), the one placeholder line (`paths = [...]  # your image files:
replace with yours`) given the test's files, each card in a fresh Python (`python -I -S`: only the environment's
site-packages, and the repository for the code that imports sidetune; the rest must run without sidetune importable),
several at once. The code's own `probs` come back, and what it printed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from services.export import Exported, export_model
from services.export.card import USAGE_HEADING
from storage.artifacts import ArtifactStore
from storage.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r"^paths = \[.*\]  # your (?:image|video) files.*$", re.M)
# Runs the card's code (argv[3]) as a script; argv[1]: site-packages; argv[2]: the repository, or "" where the code
# must run without sidetune. Prints the code's `probs` as JSON, last.
DRIVER = """
import importlib.util, json, runpy, sys
sys.path.append(sys.argv[1])
if sys.argv[2]:
    sys.path.insert(0, sys.argv[2])
else:
    assert all(importlib.util.find_spec(m) is None for m in ("services", "storage")), "sidetune found"
import numpy as np
probs = runpy.run_path(sys.argv[3], run_name="__main__")["probs"]
print(json.dumps(np.asarray(probs, dtype=np.float64).tolist()))
"""


def exporter(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Exported]:
    """A model's export (model id, format), written once: for a module's tests to share (a module-scoped fixture)."""
    made: dict[tuple[str, str], Exported] = {}

    def get(model_id: str, fmt: str) -> Exported:
        if (model_id, fmt) not in made:
            folder = tmp_path_factory.mktemp(f"export-{fmt}")
            made[model_id, fmt] = export_model(ArtifactStore.from_settings(settings), settings, model_id, fmt, folder)
        return made[model_id, fmt]

    return get


def unpack(exported: Exported, folder: Path) -> str:
    """Put the export where its card's code runs (`folder`) as a user gets it; its card."""
    folder.mkdir(parents=True)
    if exported.filename.endswith(".zip"):
        with zipfile.ZipFile(exported.path) as z:
            z.extractall(folder)
        return (folder / "README.md").read_text()
    (folder / exported.filename).write_bytes(exported.path.read_bytes())
    return {p.key: p.value for p in onnx.load(str(exported.path)).metadata_props}["model_card"]


def blocks(card: str) -> list[str]:
    """The python blocks of the card's loading section."""
    return re.findall(r"```python\n(.*?)```", card.split(f"\n{USAGE_HEADING}\n", 1)[1], flags=re.S)


def given(code: str, paths: list[str]) -> str:
    """`code` with its placeholder line (exactly one) listing `paths`."""
    assert len(PLACEHOLDER.findall(code)) == 1, code
    return PLACEHOLDER.sub(lambda _: f"paths = {json.dumps(paths)}", code)


@dataclass
class Run:
    """A card's code running in a fresh Python."""

    process: subprocess.Popen
    paths: list[str]

    def result(self) -> np.ndarray:
        """The code's `probs` (a row per file), once it has exited; it must have printed a line per file."""
        out, err = self.process.communicate(timeout=300)
        assert self.process.returncode == 0, err[-3000:]
        lines = out.strip().splitlines()
        printed = [line.split(" ", 1)[0] for line in lines[:-1]]
        assert printed == self.paths, out[-3000:]
        return np.array(json.loads(lines[-1]))


def start(code: str, folder: Path, paths: list[str]) -> Run:
    """Run `code`, its placeholder given `paths`, in `folder` in a fresh Python; sidetune importable only where the
    code imports it (the adapter layout's)."""
    script = folder.parent / f"{folder.name}-card.py"
    script.write_text(given(code, paths))
    sidetune = str(ROOT) if re.search(r"^from services\.", code, re.M) else ""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    # one thread each: several run at once; offline: the code reads the folder only
    env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(folder.parent / "hf-home")}
    site = sysconfig.get_paths()["purelib"]
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", DRIVER, site, sidetune, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=folder,
        env=env,
    )
    return Run(process, paths)
