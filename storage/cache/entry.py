"""One cache entry: the activations of one backbone on one dataset, as a sharded Zarr v3 group (layout in
storage/cache/__init__.py), plus the small helpers the extractor and readers share."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr
from numcodecs import BitRound
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from storage.cache import files
from storage.cache.meta import Creator, EntryDescription, EntryMeta, EntrySummary, KeyFamily, KeyVariant

log = logging.getLogger("sidetune.cache")

CODECS = ("none", "zstd", "blosc")
TOKEN_MODES = ("all", "cls", "mean")
CHUNK_BYTES = 1 << 20  # the read unit: large enough for sequential disk reads, small enough for random batches


def cache_key(parts: KeyFamily | KeyVariant) -> str:
    """A stable key for everything that determines the cached activations: a family's, or a variant's in it."""
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


class CacheEntry:
    def __init__(
        self, path: str | Path, key: str | None = None, fs: fsspec.AbstractFileSystem | None = None, native: bool = True
    ) -> None:
        """`path` on `fs` (default: the local filesystem, where `path` and `features` are usable Paths)."""
        if fs is None:
            fs, root, native = files.filesystem(path)
        else:
            root = str(path)
        self.fs, self.root, self.native = fs, root, native
        self.path = Path(self.root)
        self.key = key or self.path.name
        self.features = self.path / "features.zarr"
        self._meta: EntryMeta | None = None  # immutable once written, so read once

    def _file(self, name: str) -> str:
        return files.join(self.root, name)

    # ---- state ------------------------------------------------------------------------------------
    def _group(self, mode: str = "r") -> zarr.Group:
        return files.open_group(self.fs, self._file("features.zarr"), self.native, mode)

    @property
    def exists(self) -> bool:
        return self.fs.exists(self._file("features.zarr/zarr.json"))

    @property
    def is_complete(self) -> bool:
        return self.exists and bool(self._group().attrs.get("complete", False))

    @property
    def meta(self) -> EntryMeta:
        if self._meta is None:
            if not self.exists:
                raise CacheError(f"no cache entry at {self.path}")
            meta = self._group().attrs.get("meta")
            if meta is None:  # written last by create: a crash left the arrays and no metadata
                raise CacheError(f"cache entry {self.key} was never finished being created")
            self._meta = EntryMeta(**meta)
        return EntryMeta(**self._meta)

    @property
    def summary(self) -> EntrySummary:
        return EntrySummary(**self._group().attrs.get("summary", {}))

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    def covers(self, layers: list[int], tokens: str) -> bool:
        """Whether this entry holds `layers` with `tokens` (all tokens can be pooled to cls or mean on read)."""
        meta = self.meta
        return set(layers) <= set(meta["layers"]) and meta["token_mode"] in (tokens, "all")

    def touch(self) -> bool:
        """Mark the entry as used now, for least-recently-used eviction. Best effort: a full disk or an unreachable
        store only makes the entry look older (a warning is logged), never fails the job that reads it."""
        try:
            files.write_bytes(self.fs, self._file("last_used"), str(time.time()).encode())
            return True
        except Exception as e:  # an OSError (ENOSPC), or an object store's own errors
            log.warning(
                "could not mark cache entry %s as used (%s: %s); eviction may take it for older than it is",
                self.key,
                type(e).__name__,
                e,
            )
            return False

    @property
    def last_used(self) -> float:
        try:
            return float(files.read_bytes(self.fs, self._file("last_used")))
        except (OSError, ValueError):
            return 0.0

    @property
    def created(self) -> float:
        """When the metadata was last written (completion, for a complete entry)."""
        try:
            return float(self.fs.modified(self._file("features.zarr/zarr.json")).timestamp())
        except (OSError, NotImplementedError, AttributeError):
            return 0.0

    # ---- owners: the key that created the entry (its bytes count against it) and the keys that used it ----------
    def claim(self, owner: str, planned_bytes: int) -> bool:
        """Record `owner` as the creator, with the bytes the entry will take, unless a key created it already (call
        under the entry's lock); True if this call recorded it. The creator is a user too."""
        if self.fs.exists(self._file("owner.json")):
            return False
        files.write_bytes(
            self.fs,
            self._file("owner.json"),
            json.dumps({"owner": owner, "planned_bytes": int(planned_bytes)}).encode(),
        )
        self.use(owner)
        return True

    @property
    def creator(self) -> Creator:
        """`{"owner", "planned_bytes"}` as `claim` recorded them; {} for an entry made before owners were recorded."""
        try:
            return json.loads(files.read_bytes(self.fs, self._file("owner.json")))
        except (OSError, ValueError):
            return {}

    def use(self, owner: str) -> None:
        """Record that a job of `owner` read (or will read) this entry."""
        files.write_bytes(self.fs, self._file(f"users/{owner}"), b"")

    @property
    def users(self) -> list[str]:
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._file("users"), detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def charged_bytes(self) -> int:
        """What the entry counts against its creator: its bytes, or while it is incomplete (being written), the
        bytes planned for it if more."""
        nbytes = self.nbytes()
        try:
            complete = self.is_complete
        except OSError:  # vanished meanwhile (evicted by another process)
            return 0
        return nbytes if complete else max(nbytes, int(self.creator.get("planned_bytes", 0)))

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
        meta: EntryDescription,
        codec: str = "none",
        keepbits: int | None = None,
    ) -> None:
        """Create the arrays, or keep an existing entry of the same shape so extraction can resume.
        `token_count` is the backbone's token count T (stored: T for `all`, 1 for `cls`/`mean`)."""
        n = len(labels)
        stored_tokens = token_count if tokens == "all" else 1
        shape = [n, len(layers), stored_tokens, dim]
        if self.exists and "meta" in self._group().attrs:  # without meta: a crash during create; made again below
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
        rows = _rows_per_chunk(batch_size, stored_tokens * dim * 2)
        self.fs.makedirs(self.root, exist_ok=True)
        g = self._group("w")
        g.create_array(
            "acts",
            shape=shape,
            shards=(batch_size, len(layers), stored_tokens, dim),
            chunks=(rows, 1, stored_tokens, dim),
            dtype="float16",
            compressors=compressors,
            fill_value=0,
        )
        labels = np.asarray(labels, dtype="int64")  # [n] classes, or [n, tags] 0/1 for multi-label datasets
        g.create_array("labels", data=labels, chunks=(max(n, 1), *labels.shape[1:]))
        g.create_array("valid", shape=(n,), chunks=(batch_size,), dtype="bool", fill_value=False)
        n_batches = -(-n // batch_size)
        g.create_array("batch_done", shape=(n_batches,), chunks=(1,), dtype="bool", fill_value=False)
        # Meta last: an entry without meta is treated as absent, so a crash above leaves no half entry.
        g.attrs.update(
            {
                "meta": {
                    **meta,
                    "shape": shape,
                    "layers": list(layers),
                    "token_mode": tokens,
                    "batch_size": batch_size,
                    "chunk_rows": rows,
                    "codec": codec,
                    "keepbits": keepbits,
                }
            }
        )

    def pending_batches(self) -> list[int]:
        done = self._group()["batch_done"][:]
        return [int(i) for i in np.flatnonzero(~done)]

    def batch_range(self, batch: int) -> tuple[int, int]:
        meta = self.meta
        bs, n = meta["batch_size"], meta["shape"][0]
        return batch * bs, min(n, (batch + 1) * bs)

    def stored(self, batch: int, acts: np.ndarray) -> np.ndarray:
        """Batch `batch`'s activations as they are stored: float16, mantissas rounded to `keepbits` (numcodecs'
        BitRound, applied before writing rather than as a filter, so the arrays stay within the Zarr v3 spec)."""
        start, stop = self.batch_range(batch)
        if acts.shape[0] != stop - start:
            raise CacheError(f"batch {batch} needs {stop - start} rows, got {acts.shape[0]}")
        data = np.ascontiguousarray(acts, dtype=np.float16)
        keepbits = self.meta.get("keepbits")
        if keepbits is not None:
            data = BitRound(keepbits=keepbits).encode(data).view(np.float16)
        return data

    def write_batch(self, batch: int, acts: np.ndarray, valid: np.ndarray) -> None:
        """Write one whole batch with zarr-python (storage/cache/writer.py writes many at once); its done flag is
        written after the data, so a crash redoes it."""
        data = self.stored(batch, acts)
        start, stop = self.batch_range(batch)
        # write_empty_chunks: skip zarr's scan of every chunk for the fill value (activations are never all zero;
        # a chunk that is, of rows whose images were corrupt, reads back the same either way): -30% writer CPU
        self._group("r+")["acts"].with_config({"write_empty_chunks": True})[start:stop] = data
        self.mark_batch(batch, valid)

    def mark_batch(self, batch: int, valid: np.ndarray) -> None:
        """Once batch `batch`'s activations are written: its `valid` rows, then its done flag."""
        g = self._group("r+")
        start, stop = self.batch_range(batch)
        g["valid"][start:stop] = valid
        g["batch_done"][batch] = True

    def save_readout(self, tensors: dict[str, np.ndarray]) -> None:
        data = save_tensors({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()})
        files.write_bytes(self.fs, self._file("readout.safetensors"), data)

    @property
    def has_readout(self) -> bool:
        return self.fs.exists(self._file("readout.safetensors"))

    def mark_complete(self, summary: EntrySummary) -> None:
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
        return load_tensors(files.read_bytes(self.fs, self._file("readout.safetensors")))

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
        cols = [stored.index(layer) for layer in wanted]
        col_index = cols if cols != list(range(acts.shape[1])) else slice(None)
        n = acts.shape[0]
        if indices is None:
            return self._pooled(acts.oindex[:, col_index], tokens)
        rows = np.asarray(indices, dtype=np.int64)
        result = np.empty((len(rows), len(cols), *acts.shape[2:]), dtype=np.float16)
        # Read runs of whole chunks with plain slices (zarr then decodes each needed chunk once; integer-array
        # indexing would decode a shard per row), and pick the rows in numpy.
        chunk = meta.get("chunk_rows") or meta["batch_size"]
        ids = np.unique(rows // chunk)
        # Runs of consecutive chunks, each at most ~64 MiB, so a read never holds much more than its result.
        row_bytes = int(np.prod(acts.shape[2:])) * len(cols) * 2
        most = max(1, (64 << 20) // max(1, row_bytes * chunk))
        breaks = np.flatnonzero((np.diff(ids) != 1) | (np.arange(1, len(ids)) % most == 0)) + 1
        runs = np.split(ids, breaks) if len(ids) else []
        for run in runs:
            start, stop = int(run[0]) * chunk, min(n, (int(run[-1]) + 1) * chunk)
            block = acts.oindex[start:stop, col_index]
            inside = (rows >= start) & (rows < stop)
            result[inside] = block[rows[inside] - start]
        return self._pooled(result, tokens)

    def _pooled(self, acts: np.ndarray, tokens: str | None) -> np.ndarray:
        """`acts` as stored, pooled to `tokens` when the entry holds all tokens."""
        meta = self.meta
        tokens = tokens or meta["token_mode"]
        if tokens != meta["token_mode"]:
            if meta["token_mode"] != "all":
                raise CacheError(f"cache entry {self.key} holds {meta['token_mode']} tokens, not {tokens}")
            acts = pool_tokens(acts.astype(np.float32), tokens, meta["num_prefix_tokens"]).astype(np.float16)
        return acts

    def nbytes(self) -> int:
        return files.tree_bytes(self.fs, self.root)
