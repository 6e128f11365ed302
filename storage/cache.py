"""The feature cache: per-layer token activations of a frozen backbone, one Zarr v3 group per cache key.

Layout of one entry, `<cache_dir>/<key>/`:
    features.zarr/   acts [N, L, T, D] float16 (chunk = one extraction batch x one layer, so a reader of
                     one layer decodes only that layer), labels [N] int64, valid [N] bool (False for
                     images that could not be decoded), batch_done [n_batches] bool (one chunk each, so
                     distinct writers never touch the same chunk); attrs: meta, then `complete` last.
    readout.safetensors  the backbone's final norm(s), needed to turn a cached last layer into features.

The interface speaks numpy and hides zarr: callers never import zarr. Arrays are opened inside the
calling process and never kept across a fork (zarr runs an asyncio loop in a background thread).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from storage.artifacts import read_tensors, write_tensors

CODECS = ("none", "zstd")


def cache_key(parts: dict[str, Any]) -> str:
    """A stable key for everything that determines the cached activations."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class CacheError(RuntimeError):
    pass


class CacheEntry:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.features = self.path / "features.zarr"
        self._meta: dict[str, Any] | None = None  # immutable once written, so read once

    # ---- state ------------------------------------------------------------------------------------
    def _group(self, mode: str = "r") -> zarr.Group:
        return zarr.open_group(self.features, mode=mode)

    @property
    def exists(self) -> bool:
        return (self.features / "zarr.json").exists()

    @property
    def is_complete(self) -> bool:
        return self.exists and bool(self._group().attrs.get("complete", False))

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            if not self.exists:
                raise CacheError(f"no cache entry at {self.path}")
            self._meta = dict(self._group().attrs["meta"])
        return dict(self._meta)

    @property
    def summary(self) -> dict[str, Any]:
        return dict(self._group().attrs.get("summary", {}))

    # ---- writing ----------------------------------------------------------------------------------
    def create(
        self,
        *,
        labels: np.ndarray,
        num_layers: int,
        tokens: int,
        dim: int,
        batch_size: int,
        meta: dict[str, Any],
        codec: str = "none",
    ) -> None:
        """Create the arrays, or keep an existing entry of the same shape so extraction can resume."""
        n = len(labels)
        shape = [n, num_layers, tokens, dim]
        if self.exists:
            stored = self.meta
            if stored.get("shape") != shape or stored.get("batch_size") != batch_size:
                raise CacheError(f"cache entry {self.path.name} exists with another shape; remove it to rebuild")
            return
        if codec not in CODECS:
            raise CacheError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
        compressors = None if codec == "none" else zarr.codecs.ZstdCodec(level=1)
        self.path.mkdir(parents=True, exist_ok=True)
        g = self._group("w")
        g.create_array(
            "acts", shape=shape, chunks=(batch_size, 1, tokens, dim), dtype="float16",
            compressors=compressors, fill_value=0,
        )  # fmt: skip
        g.create_array("labels", data=np.asarray(labels, dtype="int64"), chunks=(max(n, 1),))
        g.create_array("valid", shape=(n,), chunks=(batch_size,), dtype="bool", fill_value=False)
        n_batches = -(-n // batch_size)
        g.create_array("batch_done", shape=(n_batches,), chunks=(1,), dtype="bool", fill_value=False)
        # Meta last: an entry without meta is treated as absent, so a crash above leaves no half entry.
        g.attrs.update({"meta": {**meta, "shape": shape, "batch_size": batch_size, "codec": codec}})

    def pending_batches(self) -> list[int]:
        done = self._group()["batch_done"][:]
        return [int(i) for i in np.flatnonzero(~done)]

    def batch_range(self, batch: int) -> tuple[int, int]:
        meta = self.meta
        bs, n = meta["batch_size"], meta["shape"][0]
        return batch * bs, min(n, (batch + 1) * bs)

    def write_batch(self, batch: int, acts: np.ndarray, valid: np.ndarray) -> None:
        """Write one whole batch; its done flag is written after the data, so a crash redoes it."""
        g = self._group("r+")
        start, stop = self.batch_range(batch)
        if acts.shape[0] != stop - start:
            raise CacheError(f"batch {batch} needs {stop - start} rows, got {acts.shape[0]}")
        g["acts"][start:stop] = acts.astype(np.float16, copy=False)
        g["valid"][start:stop] = valid
        g["batch_done"][batch] = True

    def save_readout(self, tensors: dict[str, np.ndarray]) -> None:
        write_tensors(self.path / "readout.safetensors", tensors)

    def mark_complete(self, summary: dict[str, Any]) -> None:
        if self.pending_batches():
            raise CacheError("cannot mark a cache entry complete while batches are missing")
        g = self._group("r+")
        g.attrs.update({"summary": summary})
        g.attrs.update({"complete": True})

    # ---- reading ----------------------------------------------------------------------------------
    def labels(self) -> np.ndarray:
        return self._group()["labels"][:]

    def valid(self) -> np.ndarray:
        return self._group()["valid"][:]

    def readout(self) -> dict[str, np.ndarray]:
        return read_tensors(self.path / "readout.safetensors")

    def read(self, indices: np.ndarray | None = None, layers: list[int] | None = None) -> np.ndarray:
        """float16 activations [len(indices), len(layers), T, D]; indices are read in sorted order."""
        acts = self._group()["acts"]
        n, num_layers = acts.shape[:2]
        rows = np.arange(n) if indices is None else np.asarray(indices)
        cols = list(range(num_layers)) if layers is None else list(layers)
        order = np.argsort(rows, kind="stable")
        out = acts.oindex[rows[order], cols]
        result = np.empty_like(out)
        result[order] = out
        return result

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


class FeatureCache:
    """All cache entries under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, key: str) -> CacheEntry:
        return CacheEntry(self.root / key)

    def remove(self, key: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)
