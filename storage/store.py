"""The store: one fsspec location for everything a second machine needs (models and checkpoints in
storage/artifacts.py, uploaded datasets in storage/datasets.py, and the feature cache unless it has a URL of its
own). `SIDETUNE_STORE_URL`: a local directory by default (the data dir), `file:///shared/dir`, or `s3://bucket/dir`
with s3fs installed (endpoint and credentials from the usual `AWS_*` variables).

Writes are atomic on object stores too: a file goes to a temporary key that is then moved to its final one, so a
reader never sees half of it; a folder that must be whole (a model, a dataset) gets a completion marker written
last, listing its files and their sizes, and a reader checks the marker and the sizes before using it
(`Folder.check`). Every operation goes through storage/faults.py's `store_call`: an outage is retried briefly, a full
disk is `DiskFull` naming the store and the bytes, and other errors than a missing file become `StoreUnavailable`
(the API answers 503 with Retry-After); knows nothing of HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from typing_extensions import TypedDict

from storage.cache.files import filesystem
from storage.faults import Incomplete, StoreUnavailable, naming_disk_full, store_call

__all__ = ["MARKER", "Folder", "Incomplete", "Marker", "MarkerInfo", "Store", "StoreUnavailable"]

T = TypeVar("T")
MARKER = "_complete.json"


class MarkerInfo(TypedDict, total=False):
    """What a folder's owner adds to its completion marker."""

    model_id: str  # a model's folder (storage/artifacts.py)
    dataset_id: str  # an uploaded dataset's (storage/datasets.py), with the four below
    rel: str  # the dataset's path inside its `files/`
    format: str  # its format: imagefolder, csv
    mtimes: dict[str, int]  # each file's modification time (ns), restored on every machine that fetches it


class Marker(MarkerInfo):
    """A whole folder's completion marker (MARKER): every file with its size, and what its owner added."""

    files: dict[str, int]


TMP_PREFIX = ".tmp-"  # temporary keys: never listed as files of a folder


class Folder:
    """A folder on the store; names inside it are relative POSIX paths (`plots/loss.png`)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, url: str, native: bool) -> None:
        self.fs, self.path, self.url, self.native = fs, path.rstrip("/"), url.rstrip("/"), native

    def __repr__(self) -> str:
        return f"Folder({self.url!r})"

    def child(self, *parts: str) -> Folder:
        return Folder(self.fs, posixpath.join(self.path, *parts), posixpath.join(self.url, *parts), self.native)

    def _key(self, name: str) -> str:
        parts = [p for p in name.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise ValueError(f"bad file name {name!r} in a store folder")
        return posixpath.join(self.path, *parts)

    def _call(self, call: Callable[[], T], what: str, need: int | None = None) -> T:
        return store_call(self.url, call, what, need)

    @property
    def local_path(self) -> Path | None:
        """The folder as a local path, where the store is a local directory."""
        return Path(self.path) if self.native else None

    # ---- files ------------------------------------------------------------------------------------------------
    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic: written under a temporary key in the same folder, then moved to `name`."""
        key = self._key(name)
        head, tail = posixpath.split(key)

        def write() -> None:
            tmp = posixpath.join(head, f"{TMP_PREFIX}{tail}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            self.fs.makedirs(head, exist_ok=True)
            try:
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, key)
            except BaseException:
                with contextlib.suppress(Exception):  # the write's own error is the one to raise
                    self.fs.rm_file(tmp)
                raise

        self._call(write, f"writing {name}", need=len(data))

    def read_bytes(self, name: str) -> bytes:
        key = self._key(name)
        return self._call(lambda: self.fs.cat_file(key), f"reading {name}")

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def exists(self, name: str | None = None) -> bool:
        key = self._key(name) if name else self.path
        return self._call(lambda: self.fs.exists(key), f"looking up {name or 'the folder'}")

    def files(self) -> dict[str, int]:
        """Every file under the folder (recursively) and its size; temporary keys and the marker left out."""
        try:
            found = self._call(lambda: self.fs.find(self.path, detail=True), "listing the folder")
        except FileNotFoundError:
            return {}
        out = {}
        for key, info in found.items():
            if info.get("type") == "directory":
                continue
            name = posixpath.relpath(key.rstrip("/"), self.path)
            if name != MARKER and not any(p.startswith(TMP_PREFIX) for p in name.split("/")):
                out[name] = int(info["size"])
        return out

    def modified(self, name: str) -> float | None:
        """Unix time of the file's last write, where the store tells (local files, S3)."""
        key = self._key(name)

        def modified() -> float | None:
            try:
                return self.fs.modified(key).timestamp()
            except NotImplementedError:
                return None

        return self._call(modified, f"reading {name}")

    def remove(self) -> None:
        """Delete the folder: its marker first, so no reader takes what is left for whole."""

        def remove() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._key(MARKER))
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path, recursive=True)

        self._call(remove, "removing the folder")

    # ---- whole folders ----------------------------------------------------------------------------------------
    def seal(self, info: MarkerInfo | None = None) -> Marker:
        """Write the completion marker, last: the folder's files with their sizes, and `info`."""
        marker = Marker(files=self.files(), **(info or {}))
        self.write_json(MARKER, marker)
        return marker

    def sealed(self) -> Marker | None:
        """The completion marker, or None while the folder is not complete."""
        try:
            return self.read_json(MARKER)
        except FileNotFoundError:
            return None

    def check(self) -> Marker:
        """The marker, after checking that every file it lists is there with its size; Incomplete otherwise."""
        marker = self.sealed()
        if marker is None:
            raise Incomplete(f"{self.url} is incomplete: no completion marker ({MARKER})")
        present = self.files()
        for name, size in marker["files"].items():
            if name not in present:
                raise Incomplete(f"{self.url} is incomplete: {name} is missing")
            if present[name] != size:
                raise Incomplete(f"{self.url} is incomplete: {name} has {present[name]} bytes, not {size}")
        return marker

    def put_tree(self, local: Path) -> None:
        """Upload the files under a local folder into this one, concurrently where the store can (s3fs). Not atomic
        file by file: a folder is only used once its completion marker is written, after this."""
        paths = sorted(p for p in local.rglob("*") if p.is_file())
        if paths:
            keys = [self._key(p.relative_to(local).as_posix()) for p in paths]
            need = sum(p.stat().st_size for p in paths)
            self._call(lambda: self.fs.put([str(p) for p in paths], keys), f"uploading {local}", need)

    def get_tree(self, local: Path, names: list[str], need: int | None = None) -> None:
        """Download `names` into a local folder (which the caller moves into place once complete); a full local disk
        is DiskFull naming `local` (`need`: the bytes of the files, where the caller knows them)."""
        dests = [local.joinpath(*name.split("/")) for name in names]
        for dest in dests:
            dest.parent.mkdir(parents=True, exist_ok=True)
        if names:
            keys = [self._key(n) for n in names]

            def fetch() -> None:
                with naming_disk_full(local, f"a copy of {self.url}", need):
                    self.fs.get(keys, [str(d) for d in dests])

            self._call(fetch, f"fetching into {local}")


class Store:
    """The root of the store: `Store(settings.store_location)`."""

    def __init__(self, url: str | Path) -> None:
        self.fs, self.root, self.native = filesystem(url)
        self.url = str(url) if "://" in str(url) else self.root

    def folder(self, *parts: str) -> Folder:
        return Folder(self.fs, self.root, self.url, self.native).child(*parts)
