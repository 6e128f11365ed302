"""The artifact store: one folder per model (weights as safetensors, config and metrics as JSON, and named files
such as the evaluation report and plots) and one per running job's checkpoints. Writes go to a temporary name and
are renamed into place, so a crash never leaves a half-written file under a final name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_tensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    # np.ascontiguousarray turns a 0-d array into shape (1,): keep scalars (e.g. LoSA's scales) 0-d
    save_file({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}, str(tmp),
              metadata=metadata)  # fmt: skip
    os.replace(tmp, path)


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


class ArtifactStore:
    """`models/<model_id>/{weights.safetensors, config.json, metrics.json, <named files>}`, `checkpoints/<job_id>/`."""

    FILE_NAME = re.compile(r"^[a-z0-9_]+(/[a-z0-9_]+)?\.(json|png)$")  # e.g. `evaluation.json`, `plots/curves.png`

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def model_dir(self, model_id: str) -> Path:
        return self.root / "models" / model_id

    def checkpoint_dir(self, job_id: str) -> Path:
        return self.root / "checkpoints" / job_id

    def save_model(
        self, model_id: str, weights: dict[str, np.ndarray], config: dict[str, Any], metrics: dict[str, Any],
        files: dict[str, bytes] | None = None,
    ) -> Path:  # fmt: skip
        """`files`: other named files of the model (see `FILE_NAME`)."""
        d = self.model_dir(model_id)
        write_tensors(d / "weights.safetensors", weights)
        write_json(d / "metrics.json", metrics)
        for name, data in (files or {}).items():
            atomic_write_bytes(d / self._checked(name), data)
        write_json(d / "config.json", config)  # last: a model folder without config.json is incomplete
        return d

    def _checked(self, name: str) -> str:
        if not self.FILE_NAME.match(name):
            raise ValueError(f"invalid model file name {name!r}")
        return name

    def read_file(self, model_id: str, name: str) -> bytes:
        """A named file of a complete model; FileNotFoundError when the model or the file does not exist."""
        if not self.has_model(model_id):
            raise FileNotFoundError(f"no model {model_id!r}")
        return (self.model_dir(model_id) / self._checked(name)).read_bytes()

    def has_model(self, model_id: str) -> bool:
        return (self.model_dir(model_id) / "config.json").exists()

    def load_model(self, model_id: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        d = self.model_dir(model_id)
        return read_tensors(d / "weights.safetensors"), read_json(d / "config.json")

    def drop_checkpoints(self, job_id: str) -> None:
        shutil.rmtree(self.checkpoint_dir(job_id), ignore_errors=True)
