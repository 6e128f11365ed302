"""All cache entries under one root: lookup of a covering entry, least-recently-used eviction (what to evict is
storage/cache/eviction.py's to choose), removal of one entry, and the free space of the cache's disk."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from storage.cache import eviction, files
from storage.cache.entry import CacheEntry, CacheError
from storage.faults import free_bytes


class EvictionGuard(Protocol):
    """What makes eviction safe across processes (storage.redis.locks.Pins): entered around a whole eviction (one
    evictor at a time); `begin_eviction(key)` atomically refuses a key in use and otherwise keeps new users off
    it until `end_eviction(key)`."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> Any: ...

    def begin_eviction(self, key: str) -> bool: ...

    def end_eviction(self, key: str) -> None: ...


class FeatureCache:
    """All cache entries under one root, a local directory or an fsspec URL; a key is `<family>/<variant>`."""

    def __init__(self, root: str | Path) -> None:
        self.fs, self.root, self.native = files.filesystem(root)

    def entry(self, key: str) -> CacheEntry:
        return CacheEntry(files.join(self.root, key), key, self.fs, self.native)

    def _dirs(self, path: str) -> list[str]:
        """Names of the subdirectories of `path`, sorted; dot-names (evicted entries on their way out) skipped."""
        try:
            listing = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = (item["name"].rstrip("/").rsplit("/", 1)[-1] for item in listing if item["type"] == "directory")
        return sorted(n for n in names if not n.startswith("."))

    def family(self, family: str) -> list[CacheEntry]:
        return [self.entry(f"{family}/{name}") for name in self._dirs(files.join(self.root, family))]

    def entries(self) -> list[CacheEntry]:
        """Every entry, complete or not."""
        return [e for name in self._dirs(self.root) for e in self.family(name)]

    def find(self, family: str, layers: list[int], tokens: str) -> CacheEntry | None:
        """The smallest complete entry of `family` that covers `layers` and `tokens`, if any."""
        found = [e for e in self.family(family) if self._usable(e, layers, tokens)]
        return min(found, key=lambda e: int(np.prod(e.meta["shape"]))) if found else None

    def remove(self, key: str) -> None:
        self._rm(files.join(self.root, key))

    def _rm(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.rm(path, recursive=True)

    def total_bytes(self) -> int:
        """Bytes on disk of all entries, complete or not."""
        return sum(e.nbytes() for e in self.entries())

    def created_by(self, owner: str) -> list[CacheEntry]:
        """The entries `owner` (a key's id, storage.quotas.owner_key) created."""
        return [e for e in self.entries() if e.creator.get("owner") == owner]

    def owner_bytes(self, owner: str) -> tuple[int, int]:
        """(bytes charged to `owner`, of which in complete entries that its eviction may remove)."""
        charged = [(e.charged_bytes(), self._complete(e)) for e in self.created_by(owner)]
        return sum(n for n, _ in charged), sum(n for n, complete in charged if complete)

    @property
    def local_root(self) -> str | None:
        """The root as a local directory (a plain path or a `file://` URL), or None on an object store."""
        return self.root if isinstance(self.fs, LocalFileSystem) else None

    def free_bytes(self) -> int | None:
        """Free bytes on the disk that holds the cache; None where there is no such figure (an object store)."""
        return None if self.local_root is None else free_bytes(self.local_root)

    def discard(self, key: str, guard: EvictionGuard | None = None) -> bool:
        """Remove entry `key` whole (renamed away first, so a reader sees all of it or none), unless `guard` refuses
        it (in use); True if this call removed it, False if in use or absent."""
        if guard is not None and not guard.begin_eviction(key):
            return False
        try:
            path = self._to_trash(key)
        finally:
            if guard is not None:
                guard.end_eviction(key)
        if path is None:
            return False
        self._rm(path)
        return True

    def _to_trash(self, key: str) -> str | None:
        """Rename the entry to a `.trash-*` name (atomic for readers); None if it is gone already."""
        path = files.join(self.root, f".trash-{uuid.uuid4().hex}")
        try:
            self.fs.mv(files.join(self.root, key), path, recursive=True)
        except FileNotFoundError:
            return None
        return path

    def evict(
        self,
        max_bytes: int | None = None,
        keep: Collection[str] = (),
        reserve: int = 0,
        guard: EvictionGuard | None = None,
        eligible: Callable[[CacheEntry], bool] | None = None,
        owner: str | None = None,
    ) -> list[str]:
        """Remove least recently used complete entries until `reserve` more bytes fit both `max_bytes` (the quota;
        None: none) and the free space of the cache's disk (where measurable); returns the keys this call removed
        (possibly not enough to fit: kept, in-use and incomplete entries stay). What to remove is
        storage/cache/eviction.py's `choose`, as the planner computes its promise.

        Candidates: complete entries whose key is not in `keep` (pass e.g. the caller's own entry) and that
        `eligible` accepts (default: every one). Incomplete entries are never evicted (an extraction may be writing
        them). Recency is `last_used` (touch()), or the entry's completion time if it was never touched. Each
        removal renames the entry to a `.trash-*` name first (atomic: readers see the whole entry or none), then
        deletes it, so evictors running at once never remove anything twice or by halves. With a `guard`
        (storage.redis.locks.Pins): evictors take turns across processes, so the quota is met exactly, and an entry
        pinned by any process is skipped, atomically with the decision to remove it. Without one, two evictors at once
        may remove a little more than needed.
        With `owner` (a key's quota, services/jobs/quotas.py), only the entries that key created count and may go,
        each as its `charged_bytes`, against `max_bytes` alone (the disk is the global call's concern).
        """
        for stale in self.fs.glob(files.join(self.root, ".trash-*")):  # left by an evictor that died midway
            self._rm(stale)
        trash: list[str] = []

        def remove(candidate: eviction.Candidate) -> bool:
            if guard is not None and not guard.begin_eviction(candidate.key):
                return False  # in use
            try:
                path = self._to_trash(candidate.key)  # None: another evictor took it meanwhile
            finally:
                if guard is not None:
                    guard.end_eviction(candidate.key)
            if path is not None:
                trash.append(path)
            return path is not None

        with guard if guard is not None else contextlib.nullcontext():
            if owner is None:
                entries = self.entries()
                room = eviction.Room(sum(e.nbytes() for e in entries), max_bytes, self.free_bytes())
                ordered = eviction.candidates(entries, keep, eligible)
            else:
                entries = self.created_by(owner)
                room = eviction.Room(sum(e.charged_bytes() for e in entries), max_bytes, None)
                ordered = eviction.candidates(entries, keep, eligible, size=lambda e: e.charged_bytes())
            removed = eviction.choose(ordered, reserve, room, remove)
        for path in trash:  # outside the guard: deleting a large entry takes a while
            self._rm(path)
        return [c.key for c in removed]

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
