"""The feature cache: activations of a frozen backbone's blocks, one Zarr v3 group per cache entry.

Entries are grouped by family, `<cache_dir>/<family>/<variant>/`: a family is one (dataset, backbone, weights,
preprocessing); its variants differ in what they hold (which layers, which tokens) and how (codec, shard rows).
A job reuses any complete variant of its family that covers what it reads, so a linear probe after a LoSA job
on the same data runs no backbone forward. Layout of one entry:
    features.zarr/   acts [N, L', T', D] float16 for the cached blocks `meta.layers` (L' of them) and tokens
                     `meta.token_mode` (`all`: T' = every token; `cls`, `mean`: T' = 1). Sharded: one shard = one
                     extraction batch x all cached layers (the write unit, written whole); inside it, chunks of
                     about 1 MiB x one layer (the read unit, so a reader of one layer decodes only that layer).
                     labels [N] int64, valid [N] bool (False: undecodable image), batch_done [n_batches] bool
                     (one chunk each, so distinct writers never touch the same chunk); attrs: meta, then
                     `summary` and `complete` last.
    readout.safetensors  the backbone's final norm(s), needed to turn a cached last layer into features.
    last_used        touched by every reader (least-recently-used eviction).

The interface speaks numpy and hides zarr: callers never import zarr. Arrays are opened inside the
calling process and never kept across a fork (zarr runs an asyncio loop in a background thread).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import zarr
from zarr.codecs.numcodecs import BitRound

from storage.artifacts import read_tensors, write_tensors

# BitRound is a numcodecs codec, outside the Zarr v3 spec: only sidetune reads these arrays, so that is fine.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

CODECS = ("none", "zstd", "blosc")
TOKEN_MODES = ("all", "cls", "mean")
CHUNK_BYTES = 1 << 20  # the read unit: large enough for sequential disk reads, small enough for random batches


def cache_key(parts: dict[str, Any]) -> str:
    """A stable key for everything that determines the cached activations."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def pool_tokens(x: Any, mode: str, num_prefix_tokens: int) -> Any:
    """[B, L, T, D] -> the tokens `mode` keeps ([B, L, 1, D] for cls/mean), for numpy arrays and torch tensors
    alike, so the extractor, the cache reader and the predictor pool the same way."""
    if mode == "all":
        return x
    if mode == "cls":
        return x[:, :, :1]
    if mode == "mean":
        return x[:, :, num_prefix_tokens:].mean(axis=2, keepdims=True)
    raise ValueError(f"unknown token mode {mode!r}; choose one of {', '.join(TOKEN_MODES)}")


def _rows_per_chunk(batch_size: int, row_bytes: int) -> int:
    """The smallest divisor of the shard's rows whose chunk reaches CHUNK_BYTES (else the whole shard)."""
    for rows in range(1, batch_size + 1):
        if batch_size % rows == 0 and rows * row_bytes >= CHUNK_BYTES:
            return rows
    return batch_size


class CacheError(RuntimeError):
    pass


class EvictionGuard(Protocol):
    """What makes eviction safe across processes (storage.locks.Pins): entered around a whole eviction (one
    evictor at a time); `begin_eviction(key)` atomically refuses a key in use and otherwise keeps new users off
    it until `end_eviction(key)`."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> Any: ...

    def begin_eviction(self, key: str) -> bool: ...

    def end_eviction(self, key: str) -> None: ...


def _disk_bytes(path: Path) -> int:
    """Bytes of the files under `path`; files vanishing meanwhile (a concurrent eviction) count as 0."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(folder, name)).st_size
    return total


class CacheEntry:
    def __init__(self, path: Path, key: str | None = None) -> None:
        self.path = Path(path)
        self.key = key or self.path.name
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

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    def covers(self, layers: list[int], tokens: str) -> bool:
        """Whether this entry holds `layers` with `tokens` (all tokens can be pooled to cls or mean on read)."""
        meta = self.meta
        return set(layers) <= set(meta["layers"]) and meta["token_mode"] in (tokens, "all")

    def touch(self) -> None:
        (self.path / "last_used").write_text(str(time.time()))

    @property
    def last_used(self) -> float:
        try:
            return float((self.path / "last_used").read_text())
        except (OSError, ValueError):
            return 0.0

    # ---- writing ----------------------------------------------------------------------------------
    def create(
        self,
        *,
        labels: np.ndarray,
        layers: list[int],
        tokens: str,
        token_count: int,
        dim: int,
        batch_size: int,
        meta: dict[str, Any],
        codec: str = "none",
        keepbits: int | None = None,
    ) -> None:
        """Create the arrays, or keep an existing entry of the same shape so extraction can resume.
        `token_count` is the backbone's token count T (stored: T for `all`, 1 for `cls`/`mean`)."""
        n = len(labels)
        stored_tokens = token_count if tokens == "all" else 1
        shape = [n, len(layers), stored_tokens, dim]
        if self.exists:
            stored = self.meta
            if stored.get("shape") != shape or stored.get("batch_size") != batch_size:
                raise CacheError(f"cache entry {self.key} exists with another shape; remove it to rebuild")
            return
        if codec not in CODECS:
            raise CacheError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
        if tokens not in TOKEN_MODES:
            raise CacheError(f"unknown token mode {tokens!r}; choose one of {', '.join(TOKEN_MODES)}")
        compressors = {
            "none": None,
            "zstd": zarr.codecs.ZstdCodec(level=1),
            "blosc": zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),
        }[codec]
        filters = [BitRound(keepbits=keepbits)] if keepbits is not None else None
        rows = _rows_per_chunk(batch_size, stored_tokens * dim * 2)
        self.path.mkdir(parents=True, exist_ok=True)
        g = self._group("w")
        g.create_array(
            "acts", shape=shape, shards=(batch_size, len(layers), stored_tokens, dim),
            chunks=(rows, 1, stored_tokens, dim), dtype="float16", compressors=compressors, filters=filters,
            fill_value=0,
        )  # fmt: skip
        g.create_array("labels", data=np.asarray(labels, dtype="int64"), chunks=(max(n, 1),))
        g.create_array("valid", shape=(n,), chunks=(batch_size,), dtype="bool", fill_value=False)
        n_batches = -(-n // batch_size)
        g.create_array("batch_done", shape=(n_batches,), chunks=(1,), dtype="bool", fill_value=False)
        # Meta last: an entry without meta is treated as absent, so a crash above leaves no half entry.
        g.attrs.update({"meta": {**meta, "shape": shape, "layers": list(layers), "token_mode": tokens,
                                 "batch_size": batch_size, "chunk_rows": rows, "codec": codec,
                                 "keepbits": keepbits}})  # fmt: skip

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

    def read(
        self, indices: np.ndarray | None = None, layers: list[int] | None = None, tokens: str | None = None
    ) -> np.ndarray:
        """float16 activations [len(indices), len(layers), T', D] of the given blocks (0-based backbone block
        indices; default: every cached one), pooled to `tokens` when the entry holds all tokens."""
        meta = self.meta
        acts = self._group()["acts"]
        stored = meta["layers"]
        wanted = stored if layers is None else list(layers)
        missing = [layer for layer in wanted if layer not in stored]
        if missing:
            raise CacheError(f"cache entry {self.key} holds blocks {stored}, not {missing}")
        rows = np.arange(acts.shape[0]) if indices is None else np.asarray(indices)
        order = np.argsort(rows, kind="stable")  # ascending rows read chunk by chunk
        out = acts.oindex[rows[order], [stored.index(layer) for layer in wanted]]
        result = np.empty_like(out)
        result[order] = out
        tokens = tokens or meta["token_mode"]
        if tokens != meta["token_mode"]:
            if meta["token_mode"] != "all":
                raise CacheError(f"cache entry {self.key} holds {meta['token_mode']} tokens, not {tokens}")
            result = pool_tokens(result.astype(np.float32), tokens, meta["num_prefix_tokens"]).astype(np.float16)
        return result

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


class FeatureCache:
    """All cache entries under one directory; a key is `<family>/<variant>`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, key: str) -> CacheEntry:
        return CacheEntry(self.root / key, key)

    def family(self, family: str) -> list[CacheEntry]:
        d = self.root / family
        if not d.is_dir():
            return []
        return [self.entry(f"{family}/{p.name}") for p in sorted(d.iterdir()) if p.is_dir() and p.name[0] != "."]

    def entries(self) -> list[CacheEntry]:
        """Every entry, complete or not (dot-names, like evicted entries on their way out, are not entries)."""
        if not self.root.is_dir():
            return []
        return [e for d in sorted(self.root.iterdir()) if d.is_dir() and d.name[0] != "." for e in self.family(d.name)]

    def find(self, family: str, layers: list[int], tokens: str) -> CacheEntry | None:
        """The smallest complete entry of `family` that covers `layers` and `tokens`, if any."""
        found = [e for e in self.family(family) if self._usable(e, layers, tokens)]
        return min(found, key=lambda e: int(np.prod(e.meta["shape"]))) if found else None

    def remove(self, key: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)

    def total_bytes(self) -> int:
        """Bytes on disk of all entries, complete or not."""
        return sum(_disk_bytes(e.path) for e in self.entries())

    def evict(
        self, max_bytes: int, keep: Collection[str] = (), reserve: int = 0, guard: EvictionGuard | None = None
    ) -> list[str]:
        """Remove least recently used complete entries until all entries + `reserve` bytes fit in `max_bytes`;
        returns the keys this call removed (possibly not enough to fit: kept, in-use and incomplete entries stay).

        Candidates: complete entries whose key is not in `keep` (pass e.g. the caller's own entry). Incomplete
        entries are never evicted (an extraction may be writing them). Recency is `last_used` (touch()), or the
        entry's completion time if it was never touched. Each removal renames the entry to a `.trash-*` name
        first (atomic: readers see the whole entry or none), then deletes it, so evictors running at once never
        remove anything twice or by halves. With a `guard` (storage.locks.Pins): evictors take turns across
        processes, so the quota is met exactly, and an entry pinned by any process is skipped, atomically with
        the decision to remove it. Without one, two evictors at once may remove a little more than needed.
        """
        for stale in self.root.glob(".trash-*"):  # left by an evictor that died before deleting
            shutil.rmtree(stale, ignore_errors=True)
        evicted: list[str] = []
        trash: list[Path] = []
        with guard if guard is not None else contextlib.nullcontext():
            entries = self.entries()
            sizes = {e.key: _disk_bytes(e.path) for e in entries}
            keep = set(keep)
            candidates = sorted((self._recency(e), e.key) for e in entries if e.key not in keep and self._complete(e))
            for _, key in candidates:
                sizes = {k: n for k, n in sizes.items() if (self.root / k).is_dir()}  # drop what others removed
                if sum(sizes.values()) + reserve <= max_bytes:
                    break
                if key not in sizes or (guard is not None and not guard.begin_eviction(key)):
                    continue  # gone already, or in use
                path = self.root / f".trash-{uuid.uuid4().hex}"
                try:
                    os.rename(self.root / key, path)
                    evicted.append(key)
                    trash.append(path)
                except FileNotFoundError:
                    pass  # another evictor took it meanwhile
                finally:
                    if guard is not None:
                        guard.end_eviction(key)
        for path in trash:  # outside the guard: deleting a large entry takes a while
            shutil.rmtree(path, ignore_errors=True)
        return evicted

    @staticmethod
    def _usable(entry: CacheEntry, layers: list[int], tokens: str) -> bool:
        try:
            return entry.is_complete and entry.covers(layers, tokens)
        except (CacheError, OSError):  # vanished meanwhile (evicted by another process)
            return False

    @staticmethod
    def _complete(entry: CacheEntry) -> bool:
        try:
            return entry.is_complete
        except OSError:  # vanished meanwhile (evicted by another process)
            return False

    @staticmethod
    def _recency(entry: CacheEntry) -> float:
        if entry.last_used:
            return entry.last_used
        try:
            return (entry.features / "zarr.json").stat().st_mtime  # attrs, rewritten by mark_complete
        except OSError:
            return 0.0
