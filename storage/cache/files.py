"""Where the cache lives: a local directory (the default) or any fsspec URL (`s3://bucket/cache` with s3fs
installed, `file:///...`, `memory://...`). Small files are written atomically (a temporary name, then a move);
Zarr arrays go through zarr's LocalStore for plain paths and its FsspecStore for URLs.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem


def filesystem(root: str | Path) -> tuple[fsspec.AbstractFileSystem, str, bool]:
    """(filesystem, root path on it, native): native means a plain local path, opened by zarr directly."""
    text = str(root)
    if "://" not in text:
        return LocalFileSystem(auto_mkdir=True), str(Path(text).absolute()), True
    options = {"auto_mkdir": True} if text.startswith("file://") else {}
    fs, path = fsspec.core.url_to_fs(text, **options)
    return fs, path, False


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def open_group(fs: fsspec.AbstractFileSystem, path: str, native: bool, mode: str) -> zarr.Group:
    if native:
        return zarr.open_group(path, mode=mode)
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
    from zarr.storage import FsspecStore

    # zarr runs its own event loop: an async filesystem (s3fs) gets an instance of its own there, since the one the
    # sync calls use is bound to fsspec's loop ("attached to a different loop" otherwise)
    afs = (
        type(fs)(**{**fs.storage_options, "asynchronous": True})
        if fs.async_impl
        else AsyncFileSystemWrapper(fs, asynchronous=True)
    )
    return zarr.open_group(FsspecStore(afs, path=path, read_only=mode == "r"), mode=mode)


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Atomic where the filesystem allows (a local rename); object stores write whole objects anyway."""
    tmp = f"{path}.tmp{os.getpid()}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return fs.cat_file(path)


def tree_bytes(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """Bytes of the files under `path`; files vanishing meanwhile (a concurrent eviction) count as 0."""
    try:
        return int(fs.du(path, total=True))
    except (FileNotFoundError, OSError):
        return 0
