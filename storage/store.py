"""The store: one fsspec location for everything a second machine needs (models and checkpoints in
storage/artifacts.py, uploaded datasets in storage/datasets.py, and the feature cache unless it has a URL of its
own). `SIDETUNE_STORE_URL`: a local directory by default (the data dir), `file:///shared/dir`, or `s3://bucket/dir`
with s3fs installed (endpoint and credentials from the usual `AWS_*` variables).

Writes are atomic on object stores too: a file goes to a temporary key that is then moved to its final one, so a
reader never sees half of it; a folder that must be whole (a model, a dataset) gets a completion marker written
last, listing its files and their sizes, and a reader checks the marker and the sizes before using it
(`Folder.check`). Errors other than a missing file become `StoreUnavailable` (the API answers 503 with
Retry-After); knows nothing of HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec

from storage.cache.files import filesystem

MARKER = "_complete.json"
TMP_PREFIX = ".tmp-"  # temporary keys: never listed as files of a folder


class StoreUnavailable(RuntimeError):
    """The store could not be reached, or failed otherwise than with a missing file; the message names it."""


class Incomplete(RuntimeError):
    """A folder that is not whole: no completion marker, or a file it lists is missing or has another size."""


@contextlib.contextmanager
def _reaching(url: str) -> Iterator[None]:
    """Store calls: a missing file stays FileNotFoundError, anything else (no connection, refused credentials,
    a full disk) is StoreUnavailable naming the store."""
    try:
        yield
    except (FileNotFoundError, Incomplete):
        raise
    except Exception as e:  # s3fs raises botocore's and aiohttp's own errors, not OSErrors, for a lost endpoint
        raise StoreUnavailable(f"the store {url} is unavailable: {type(e).__name__}: {e}") from e


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

    @property
    def local_path(self) -> Path | None:
        """The folder as a local path, where the store is a local directory."""
        return Path(self.path) if self.native else None

    # ---- files ------------------------------------------------------------------------------------------------
    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic: written under a temporary key in the same folder, then moved to `name`."""
        key = self._key(name)
        head, tail = posixpath.split(key)
        tmp = posixpath.join(head, f"{TMP_PREFIX}{tail}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with _reaching(self.url):
            self.fs.makedirs(head, exist_ok=True)
            try:
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, key)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.fs.rm_file(tmp)
                raise

    def read_bytes(self, name: str) -> bytes:
        with _reaching(self.url):
            return self.fs.cat_file(self._key(name))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def exists(self, name: str | None = None) -> bool:
        with _reaching(self.url):
            return self.fs.exists(self._key(name) if name else self.path)

    def files(self) -> dict[str, int]:
        """Every file under the folder (recursively) and its size; temporary keys and the marker left out."""
        with _reaching(self.url):
            try:
                found = self.fs.find(self.path, detail=True)
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
        with _reaching(self.url):
            try:
                return self.fs.modified(self._key(name)).timestamp()
            except NotImplementedError:
                return None

    def remove(self) -> None:
        """Delete the folder: its marker first, so no reader takes what is left for whole."""
        with _reaching(self.url):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._key(MARKER))
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path, recursive=True)

    # ---- whole folders ----------------------------------------------------------------------------------------
    def seal(self, info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the completion marker, last: the folder's files with their sizes, and `info`."""
        marker = {"files": self.files(), **(info or {})}
        self.write_json(MARKER, marker)
        return marker

    def sealed(self) -> dict[str, Any] | None:
        """The completion marker, or None while the folder is not complete."""
        try:
            return self.read_json(MARKER)
        except FileNotFoundError:
            return None

    def check(self) -> dict[str, Any]:
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
            with _reaching(self.url):
                self.fs.put([str(p) for p in paths], [self._key(p.relative_to(local).as_posix()) for p in paths])

    def get_tree(self, local: Path, names: list[str]) -> None:
        """Download `names` into a local folder (which the caller moves into place once complete)."""
        dests = [local.joinpath(*name.split("/")) for name in names]
        for dest in dests:
            dest.parent.mkdir(parents=True, exist_ok=True)
        if names:
            with _reaching(self.url):
                self.fs.get([self._key(n) for n in names], [str(d) for d in dests])


class Store:
    """The root of the store: `Store(settings.store_location)`."""

    def __init__(self, url: str | Path) -> None:
        self.fs, self.root, self.native = filesystem(url)
        self.url = str(url) if "://" in str(url) else self.root

    def folder(self, *parts: str) -> Folder:
        return Folder(self.fs, self.root, self.url, self.native).child(*parts)
