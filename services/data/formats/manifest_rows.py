"""What the manifests (CSV: formats/csv_manifest.py; JSONL: formats/jsonl_manifest.py) share: each row's path turned
into an item and checked, the manifest on the local disk or in an object store, and the format claiming a manifest by
its suffix (`ManifestFormat`).

A row's path is relative to the manifest's folder and must stay inside it (as ever), or an absolute URL: `file://`
(a file on the server, under the allowed roots), or an object-store URL (`s3://`, `gs://`, ...: under the allowed
prefixes; read by fsspec, formats/remote.py). Each is checked by the paths rule (`inside`) before it is looked at;
absolute rows are read only under that rule (a manifest read without it, an upload being validated, may not name
them). Objects are looked up a folder at a time once every row is read, not one request per row. Torch-free.
"""

from __future__ import annotations

import io
import posixpath
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TextIO

import numpy as np

from services.data.formats import remote
from services.data.formats.base import DatasetFormat, Inside, ReadOptions
from services.data.formats.samples import Dataset, DatasetError, Item, RemoteFile, finish
from services.data.formats.urls import is_remote, local_path, scheme


def open_text(manifest: Path | str) -> TextIO:
    """The manifest's text: a local file, or an object read whole into memory (a manifest is small beside its
    images)."""
    if isinstance(manifest, str):
        return io.StringIO(remote.read_all(manifest, "manifest").decode("utf-8-sig"), newline="")
    return open(manifest, newline="")  # noqa: SIM115 - the caller closes it


@dataclass(frozen=True)
class _Row:
    target: Path | str  # the file, resolved, or the object's URL
    label: str
    line: int
    rel: str  # as the manifest writes it
    span: tuple[float, float] | None


@dataclass
class ManifestRows:
    """Rows being gathered from `manifest`: `add` each, then `dataset`."""

    manifest: Path | str
    skip: bool = False
    inside: Inside | None = None
    rows: list[_Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def root(self) -> Path | str:
        return remote.parent(self.manifest) if isinstance(self.manifest, str) else self.manifest.parent

    @property
    def name(self) -> str:
        return posixpath.basename(self.manifest) if isinstance(self.manifest, str) else self.manifest.name

    def bad(self, line: int, problem: str, advice: str = "to leave such rows out") -> None:
        """A row that cannot be used: DatasetError naming its line, or left out and noted under on_corrupt=skip."""
        if not self.skip:
            raise DatasetError(f"{self.manifest} line {line}: {problem} (set dataset.on_corrupt='skip' {advice})")
        self.skipped.append(f"{self.name} line {line}: {problem}, left out")

    def missing(self, line: int, rel: str) -> None:
        self.bad(line, f"{rel} does not exist" if self.skip else f"{rel!r} does not exist", _MISSING)

    def _target(self, line: int, rel: str) -> Path | str:
        """The row's file (a local path, resolved) or object (a URL); DatasetError if it leaves the manifest's
        folder or is absolute without the paths rule."""
        if scheme(rel) == "hf":
            raise DatasetError(f"{self.manifest} line {line}: a row names a file, not a Hugging Face dataset (hf://)")
        if scheme(rel) is not None:
            if self.inside is None:
                raise DatasetError(
                    f"{self.manifest} line {line}: a URL row is read only under the allowed roots and prefixes (name "
                    "the manifest by `dataset.path`); an uploaded manifest's rows are paths inside it"
                )
            return rel if is_remote(rel) else Path(local_path(rel)).resolve()
        if isinstance(self.manifest, str):
            url = remote.join(self.root, rel)
            if not url.startswith(str(self.root).rstrip("/") + "/"):
                raise DatasetError(f"{self.manifest} line {line}: {rel!r} points outside the manifest's folder")
            return url
        p = (self.root / rel).resolve()
        if not p.is_relative_to(self.root.resolve()):
            raise DatasetError(f"{self.manifest} line {line}: {rel!r} points outside the manifest's folder")
        return p

    def add(self, line: int, rel: str, label: str, span: tuple[float, float] | None = None) -> None:
        """A row with its path and label (its tags `|`-joined), checked by the rule; a local file missing is named
        now, objects once every row is read (`dataset`)."""
        target = self._target(line, rel)
        if self.inside is not None:  # before is_file: whether a refused file exists is not told either
            relative = scheme(rel) is None and isinstance(self.root, Path)
            self.inside(self.root / rel if relative else target, f"{self.name} line {line}")
        if isinstance(target, Path) and not target.is_file():
            self.missing(line, rel)
            return
        self.rows.append(_Row(target, label, line, rel, span))

    def dataset(self, duplicates: str, multi_label: bool, timed: bool) -> Dataset:
        """The dataset of the rows added, objects looked up a folder at a time (a missing one is a bad row)."""
        urls = [row.target for row in self.rows if isinstance(row.target, str)]
        found = remote.stat_many(urls, "file") if urls else {}
        items: list[Item] = []
        names: list[str] = []
        where: list[str] = []
        spans: list[tuple[float, float]] = []
        for row in self.rows:
            if isinstance(row.target, str):
                info = found.get(row.target)
                if info is None:
                    self.missing(row.line, row.rel)
                    continue
                items.append(RemoteFile(row.target, info.size, info.version))
            else:
                items.append(row.target)
            names.append(row.label)
            where.append(f"{self.name} line {row.line}")
            if row.span is not None:
                spans.append(row.span)
        if not items and not self.skipped:
            raise DatasetError(f"manifest {self.manifest} has no rows")
        timing = np.array(spans, dtype=np.float64).reshape(-1, 2) if timed else None
        return finish(self.root, items, names, where, duplicates, tuple(self.skipped), timing, multi_label, "labels")


_MISSING = "to leave missing files out"


class ManifestFormat(DatasetFormat):
    """A manifest format: `auto` picks it for a file (by the file a link resolves to, as the rule checks it) or an
    object whose name ends in `suffix`; `read_manifest` reads its rows."""

    suffix: ClassVar[str]

    def claims(self, location: str) -> bool:
        if is_remote(location):
            return location.lower().endswith(self.suffix)
        try:
            path = Path(location).resolve()
            return path.suffix.lower() == self.suffix and path.is_file()
        except (OSError, RuntimeError):  # a name too long, a loop of links: the rule names the problem next
            return False

    def read(self, location: str, files: list[Path | str], options: ReadOptions, inside: Inside | None) -> Dataset:
        (manifest,) = files
        return self.read_manifest(manifest, options.multi_label, options.skip_bad, options.duplicates, inside)

    @abstractmethod
    def read_manifest(
        self, manifest: Path | str, multi_label: bool, skip_bad_rows: bool, duplicates: str, inside: Inside | None
    ) -> Dataset:
        """The manifest's rows as a dataset (read_csv, read_jsonl)."""
