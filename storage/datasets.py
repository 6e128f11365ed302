"""Uploaded datasets: an archive extracted safely (storage/archives.py) into a staging folder, published to the
store only once the caller's validation passed (so a failure leaves nothing half-extracted), each machine's local
copy of it (`DatasetFiles`); their records in Redis are storage/redis/datasets.py's. Knows nothing of HTTP: failures
are `ArchiveError`s with a code the API maps to a status.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from storage.archives import ArchiveError, Limits, extract, member_parts
from storage.faults import Incomplete
from storage.redis.records import new_id
from storage.store import MARKER, Folder, Marker, MarkerInfo, Store

__all__ = [
    "STAGING",
    "ArchiveError",
    "DatasetFiles",
    "Limits",
    "disk_usage",
    "extract",
    "is_dataset_id",
    "locate",
    "member_parts",
    "new_dataset_id",
    "staging_dir",
    "sweep_staging",
    "unpack",
]

T = TypeVar("T")
STAGING = ".staging"


def new_dataset_id() -> str:
    return new_id("ds")


def is_dataset_id(name: str) -> bool:
    return re.fullmatch(r"ds_[0-9a-f]+", name) is not None


def unpack(
    archive: Path,
    datasets: DatasetFiles,
    dataset_id: str,
    limits: Limits,
    validate: Callable[[Path, str], T] = lambda path, fmt: None,
) -> tuple[Path, str, T]:
    """Extract `archive` into a staging folder, find the dataset in it (`locate`), run `validate(path, format)` on
    it (raising to refuse it), then publish it as `dataset_id` (`DatasetFiles.publish`); any failure removes the
    staging folder, so the dataset is there whole or not at all. Returns (its path relative to the dataset's
    `files/` folder, its format, what `validate` returned)."""
    with staging_dir(datasets.local_dir, dataset_id) as staging:
        folder = staging / dataset_id
        extract(archive, folder / "files", limits)
        rel, fmt = locate(folder / "files")
        result = validate(folder / "files" / rel, fmt)
        datasets.publish(folder, dataset_id, {"rel": rel.as_posix(), "format": fmt})
    return rel, fmt, result


@contextmanager
def staging_dir(datasets_dir: Path, prefix: str) -> Iterator[Path]:
    """A fresh folder under `datasets_dir/.staging` (same filesystem as the datasets, for the final rename),
    removed with whatever is left in it on exit."""
    base = datasets_dir / STAGING
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"{prefix}-{os.urandom(4).hex()}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sweep_staging(datasets_dir: Path, older_than_s: float = 24 * 3600) -> None:
    """Remove staging folders a killed process left behind (no live upload lasts this long)."""
    base = datasets_dir / STAGING
    if not base.is_dir():
        return
    cutoff = time.time() - older_than_s
    for entry in base.iterdir():
        try:
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        except FileNotFoundError:
            continue


def locate(root: Path) -> tuple[Path, str]:
    """Where the dataset lies in an extracted archive, relative to `root`, and its format: a CSV manifest at
    the top (`csv`), else an ImageFolder (one folder per class). Single top-level folders that wrap everything
    (`flowers/train/<class>/...`) are stepped into, but not a folder of images only: that is a class (and a
    dataset of one class is refused by name, not as a folder without images)."""

    def visible(folder: Path) -> list[Path]:
        return [e for e in folder.iterdir() if not e.name.startswith(".")]

    base = root
    entries = visible(base)
    for _ in range(8):
        if len(entries) != 1 or not entries[0].is_dir():
            break
        inner = visible(entries[0])
        if not any(e.is_dir() or e.suffix.lower() == ".csv" for e in inner):
            break
        base, entries = entries[0], inner
    csvs = sorted(e for e in entries if e.is_file() and e.suffix.lower() == ".csv")
    if len(csvs) > 1:
        names = ", ".join(e.name for e in csvs)
        raise ArchiveError("invalid_dataset", f"several CSV manifests at the top of the archive ({names}); keep one")
    if csvs:
        return csvs[0].relative_to(root), "csv"
    return base.relative_to(root), "imagefolder"


def disk_usage(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- on the store ---------------------------------------------------------------------------------------------
class DatasetFiles:
    """Uploaded datasets, `datasets/<id>/` on the store: `files/` (the extracted archive) and the completion
    marker (storage/store.py), written last, which lists every file with its size and modification time and
    names the dataset's `rel` path inside `files/` and its `format`.

    `local_dir` is where this machine reads them: when the store is a local directory it is the store's own
    `datasets/` (`remote` is None), read in place; otherwise a copy of each dataset is fetched from `remote` into
    `local_dir/<id>/` once, when a process on this machine first needs it, and moved into place whole (the marker
    inside it). File times are restored from the marker, so the dataset's fingerprint, and with it the feature
    cache key, is the same on every machine."""

    def __init__(self, local_dir: Path, remote: Folder | None = None) -> None:
        self.local_dir, self.remote = local_dir, remote

    @classmethod
    def from_settings(cls, settings: Any) -> DatasetFiles:
        remote = None if settings.store_dir is not None else Store(settings.store_location).folder("datasets")
        return cls(settings.datasets_dir, remote)

    def publish(self, folder: Path, dataset_id: str, info: MarkerInfo) -> None:
        """Publish a complete local folder (`files/...`, in this machine's staging area) as `dataset_id`: uploaded
        to the store with its marker last, then moved into `local_dir` with the marker inside."""
        local = Store(folder).folder()
        names = local.files()
        mtimes = {name: (folder / name).stat().st_mtime_ns for name in names}
        marker = Marker(files=names, mtimes=mtimes, dataset_id=dataset_id, **info)
        if self.remote is not None:
            target = self.remote.child(dataset_id)
            target.put_tree(folder)
            target.write_json(MARKER, marker)
        local.write_json(MARKER, marker)
        os.replace(folder, self.local_dir / dataset_id)  # same filesystem: atomic, and the id is fresh

    def local(self, dataset_id: str) -> tuple[Path, Marker]:
        """This machine's folder of the dataset and its marker; fetched from the store first if needed.
        FileNotFoundError for a dataset that is not on the store, Incomplete for one that is not whole."""
        dest = self.local_dir / dataset_id
        if (dest / MARKER).is_file():
            return dest, json.loads((dest / MARKER).read_text())
        if self.remote is None:
            raise FileNotFoundError(f"uploaded dataset {dataset_id} is not in the store ({self.local_dir})")
        remote = self.remote.child(dataset_id)
        if remote.sealed() is None and not remote.files():
            raise FileNotFoundError(f"uploaded dataset {dataset_id} is not in the store ({remote.url})")
        marker = remote.check()
        with staging_dir(self.local_dir, f"fetch-{dataset_id}") as staging:
            folder = staging / dataset_id
            remote.get_tree(folder, sorted(marker["files"]), need=sum(marker["files"].values()))
            for name, size in marker["files"].items():
                path = folder.joinpath(*name.split("/"))
                if path.stat().st_size != size:
                    raise Incomplete(f"{remote.url}: {name} arrived with {path.stat().st_size} bytes, not {size}")
                mtime = marker["mtimes"][name]
                os.utime(path, ns=(mtime, mtime))
            (folder / MARKER).write_text(json.dumps(marker))
            try:
                os.replace(folder, dest)
            except OSError:
                if not (dest / MARKER).is_file():  # else another process on this machine fetched it meanwhile
                    raise
        return dest, marker

    def dataset_path(self, dataset_id: str) -> tuple[Path, str]:
        """The dataset's path on this machine (a folder or a CSV manifest) and its format."""
        folder, marker = self.local(dataset_id)
        return folder / "files" / marker["rel"], marker["format"]

    def remove(self, dataset_id: str) -> None:
        """Delete the dataset from the store (its marker first) and this machine's copy (moved into staging at once,
        so no reader sees half of it)."""
        if self.remote is not None:
            self.remote.child(dataset_id).remove()
        src = self.local_dir / dataset_id
        if src.exists():
            with staging_dir(self.local_dir, f"deleted-{dataset_id}") as trash:
                os.replace(src, trash / "files")
