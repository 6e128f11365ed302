"""The artifact store, on the store (storage/store.py): one folder per model and one per running job's checkpoints.

    models/<model_id>/       weights.safetensors, config.json (the model's manifest: services/models/manifest.py),
                             metrics.json, any further files of the model
                             (`write_file`: an evaluation report, plots/...), and the completion marker last
    checkpoints/<job_id>/    checkpoint.safetensors, checkpoint.json (services/training/checkpoint.py); kept after the
                             job ends for `checkpoint_retention_h` (services/jobs/retention.py removes them)
    jobs/<job_id>/           what of a job's resolved job is too large for its record (services/jobs/resolved.py:
                             a large dataset's split), and `tensorboard/`: its TensorBoard event files, one run per
                             configuration (services/training/tensorboard.py); removed with the job

Every file is written atomically (a temporary key, then the final one). A model is there once its completion
marker is: `save_model` writes it after every other file, and `load_model` checks it and every file's size, so a
model whose upload was cut short is `Incomplete`, never half-loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel
from safetensors.numpy import load, load_file, save, save_file

from storage.faults import Incomplete
from storage.manifests import ManifestRecord, ManifestV1Record
from storage.store import Folder, Store

__all__ = ["ArtifactStore", "Incomplete", "as_folder", "metadata_from_bytes", "tensors_from_bytes", "tensors_to_bytes"]


def tensors_to_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    # np.ascontiguousarray turns a 0-d array into shape (1,): keep scalars (e.g. LoSA's scales) 0-d
    return save({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}, metadata=metadata)


def tensors_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    return load(data)


def metadata_from_bytes(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file held in memory (safetensors reads it only from files): the format's
    8-byte little-endian header length, then the JSON header that holds it."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}


# ---- single local files (tests and benchmarks write these directly) ----------------------------------------------
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
    save_file(
        {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}, str(tmp), metadata=metadata
    )
    os.replace(tmp, path)


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def as_folder(where: Folder | str | Path) -> Folder:
    """A store folder, or a local directory (or URL) as one."""
    return where if isinstance(where, Folder) else Store(where).folder()


class ArtifactStore:
    """Models and checkpoints under `root` (a local directory or an fsspec URL: `settings.artifacts_location`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Store(root).folder()

    @classmethod
    def from_settings(cls, settings: Any) -> ArtifactStore:
        return cls(settings.artifacts_location)

    # ---- models ---------------------------------------------------------------------------------------------
    def model(self, model_id: str) -> Folder:
        return self.root.child("models", model_id)

    def save_model(
        self,
        model_id: str,
        weights: dict[str, np.ndarray],
        config: BaseModel | ManifestRecord | ManifestV1Record,
        metrics: dict[str, Any],
        files: dict[str, bytes] | None = None,
    ) -> Folder:
        """Write the model's files (weights, config: its manifest, written as JSON; metrics; and `files`: name ->
        bytes), then its marker."""
        d = self.model(model_id)
        d.write_bytes("weights.safetensors", tensors_to_bytes(weights))
        d.write_json("metrics.json", metrics)
        d.write_json("config.json", config.model_dump(mode="json") if isinstance(config, BaseModel) else config)
        for name, data in (files or {}).items():
            d.write_bytes(name, data)
        d.seal({"model_id": model_id})
        return d

    def has_model(self, model_id: str) -> bool:
        """Whether the model is complete (its marker written; the files it lists are checked on load)."""
        return self.model(model_id).sealed() is not None

    def check_model(self, model_id: str) -> None:
        """FileNotFoundError for a model that was never saved, Incomplete for one that is not whole."""
        d = self.model(model_id)
        if d.sealed() is None and not d.files():
            raise FileNotFoundError(f"model {model_id} has no artifact in the store {self.root.url}")
        d.check()

    def load_model(self, model_id: str) -> tuple[dict[str, np.ndarray], ManifestRecord | ManifestV1Record]:
        """(weights, config as stored: services.models.manifest.migrate reads it) of a complete model;
        FileNotFoundError or Incomplete otherwise."""
        self.check_model(model_id)
        d = self.model(model_id)
        return tensors_from_bytes(d.read_bytes("weights.safetensors")), d.read_json("config.json")

    def write_file(self, model_id: str, name: str, data: bytes) -> None:
        """Add or replace a file of a complete model (e.g. `evaluation.json`, `plots/confusion.png`) and update its
        marker; before `save_model`, pass files to it instead."""
        d = self.model(model_id)
        d.write_bytes(name, data)
        if d.sealed() is not None:
            d.seal({"model_id": model_id})

    def delete_model(self, model_id: str) -> None:
        """Remove the model's folder (its marker first: no reader takes what is left for whole). Idempotent."""
        self.model(model_id).remove()

    def read_file(self, model_id: str, name: str) -> bytes:
        """A file of a complete model (FileNotFoundError if it has no such file)."""
        d = self.model(model_id)
        if d.sealed() is None:
            raise Incomplete(f"model {model_id} is incomplete in the store {self.root.url}")
        return d.read_bytes(name)

    def read_json(self, model_id: str, name: str) -> Any:
        return json.loads(self.read_file(model_id, name))

    def list_files(self, model_id: str) -> list[str]:
        """The model's files (relative names, sorted), the marker left out."""
        return sorted(self.model(model_id).files())

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def checkpoints(self, job_id: str) -> Folder:
        return self.root.child("checkpoints", job_id)

    def drop_checkpoints(self, job_id: str) -> None:
        self.checkpoints(job_id).remove()

    # ---- jobs -----------------------------------------------------------------------------------------------
    def job(self, job_id: str) -> Folder:
        return self.root.child("jobs", job_id)

    def tensorboard(self, job_id: str) -> Folder:
        """The job's TensorBoard runs (GET /jobs/{id}/tensorboard downloads them)."""
        return self.job(job_id).child("tensorboard")

    def checkpointed_jobs(self) -> list[str]:
        """The jobs that have checkpoints on the store."""
        return sorted({name.split("/")[0] for name in self.root.child("checkpoints").files()})
