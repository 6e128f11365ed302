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

import os
import posixpath
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import IO, ClassVar

import numpy as np

from services.data.formats import remote
from services.data.formats.base import DatasetFormat, Inside, ReadOptions
from services.data.formats.build import finish
from services.data.formats.columns import Files, FilesBuilder, Labels, Lines, Resolver, is_file
from services.data.formats.left_out import MISSING, UNUSABLE, Notes
from services.data.formats.samples import Dataset, DatasetError, Item, RemoteFile
from services.data.formats.urls import is_remote, local_path, scheme


def open_text(manifest: Path | str) -> IO[str]:
    """The manifest's text: a local file, or an object streamed a range at a time (1,000,000 rows are some 60 MB of
    text, never held whole)."""
    if isinstance(manifest, str):
        return remote.open_text(manifest, "manifest")
    return open(manifest, newline="")  # noqa: SIM115 - the caller closes it


@dataclass
class ManifestRows:
    """Rows being gathered from `manifest`: `add` each, then `dataset`. Kept as columns (formats/columns.py): a
    local file's resolved path and stat, each row's label index, line and span, so that a manifest of a million rows
    costs arrays, not a few objects a row; an object's URL (and its row's path) one by one."""

    manifest: Path | str
    skip: bool = False
    inside: Inside | None = None
    skipped: Notes = field(default_factory=Notes)
    files: FilesBuilder = field(default_factory=FilesBuilder)
    labels: Labels = field(default_factory=Labels)
    lines: array = field(default_factory=lambda: array("q"))
    spans: array = field(default_factory=lambda: array("d"))
    objects: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (URL, its path as written)
    resolver: Resolver = field(default_factory=Resolver)

    @cached_property
    def root(self) -> Path | str:
        return remote.parent(self.manifest) if isinstance(self.manifest, str) else self.manifest.parent

    @cached_property
    def name(self) -> str:
        return posixpath.basename(self.manifest) if isinstance(self.manifest, str) else self.manifest.name

    def bad(self, line: int, problem: str, advice: str = "to leave such rows out", kind: str = UNUSABLE) -> None:
        """A row that cannot be used: DatasetError naming its line, or left out and noted under on_corrupt=skip."""
        if not self.skip:
            raise DatasetError(f"{self.manifest} line {line}: {problem} (set dataset.on_corrupt='skip' {advice})")
        self.skipped.add(kind, f"{self.name} line {line}: {problem}, left out")

    def missing(self, line: int, rel: str) -> None:
        self.bad(line, f"{rel} does not exist" if self.skip else f"{rel!r} does not exist", _MISSING, MISSING)

    def _target(self, line: int, rel: str) -> tuple[str, os.stat_result | None, bool]:
        """(the row's file, resolved, and its stat; or the object's URL), and whether it is an object; DatasetError
        if it leaves the manifest's folder or is absolute without the paths rule."""
        if scheme(rel) == "hf":
            raise DatasetError(f"{self.manifest} line {line}: a row names a file, not a Hugging Face dataset (hf://)")
        if scheme(rel) is not None:
            if self.inside is None:
                raise DatasetError(
                    f"{self.manifest} line {line}: a URL row is read only under the allowed roots and prefixes (name "
                    "the manifest by `dataset.path`); an uploaded manifest's rows are paths inside it"
                )
            if is_remote(rel):
                return rel, None, True
            return (*self.resolver.resolve(local_path(rel)), False)
        if isinstance(self.manifest, str):
            url = remote.join(self.root, rel)
            if not url.startswith(str(self.root).rstrip("/") + "/"):
                raise DatasetError(f"{self.manifest} line {line}: {rel!r} points outside the manifest's folder")
            return url, None, True
        real, st = self.resolver.resolve(os.path.join(self._root_text, rel))
        if not _inside_folder(real, self._real_root):
            raise DatasetError(f"{self.manifest} line {line}: {rel!r} points outside the manifest's folder")
        return real, st, False

    @cached_property
    def _real_root(self) -> str:
        return str(Path(self.root).resolve())

    @cached_property
    def _root_text(self) -> str:
        return str(self.root)

    def add(self, line: int, rel: str, label: str, span: tuple[float, float] | None = None) -> None:
        """A row with its path and label (its tags `|`-joined), checked by the rule; a local file missing is named
        now, objects once every row is read (`dataset`)."""
        target, st, is_object = self._target(line, rel)
        if self.inside is not None:  # before is_file: whether a refused file exists is not told either
            relative = scheme(rel) is None and isinstance(self.root, Path)
            self.inside(
                self.root / rel if relative else target if is_object else Path(target), f"{self.name} line {line}"
            )
        if not is_object:
            if not is_file(st):
                self.missing(line, rel)
                return
            self.files.add(target, st)
        else:
            self.objects[len(self.labels)] = (target, rel)
        self.labels.append(label)
        self.lines.append(line)
        if span is not None:
            self.spans.extend(span)

    def dataset(self, duplicates: str, multi_label: bool, timed: bool) -> Dataset:
        """The dataset of the rows added, objects looked up a folder at a time (a missing one is a bad row)."""
        spans = np.frombuffer(self.spans, dtype=np.float64).reshape(-1, 2).copy() if timed else None
        where = Lines(self.name, self.lines)
        if not self.objects:
            items: Sequence[Item] | Files = self.files.build()
            labels: Sequence[str] = self.labels
        else:
            items, labels, where, spans = self._with_objects(spans)
        if not len(items) and not len(self.skipped):
            raise DatasetError(f"manifest {self.manifest} has no rows")
        left_out = self.skipped.build()
        return finish(self.root, items, labels, where, duplicates, left_out, spans, multi_label, "labels")

    def _with_objects(self, spans: np.ndarray | None) -> tuple[list[Item], list[str], list[str], np.ndarray | None]:
        """The rows as lists, in the manifest's order, each object with the size and version its folder's listing
        gives; a row whose object is missing is a bad row."""
        found = remote.stat_many([url for url, _ in self.objects.values()], "file")
        files = iter(self.files.build())
        items: list[Item] = []
        names: list[str] = []
        where: list[str] = []
        kept: list[int] = []
        for row in range(len(self.labels)):
            line = self.lines[row]
            if row in self.objects:
                url, rel = self.objects[row]
                info = found.get(url)
                if info is None:
                    self.missing(line, rel)
                    continue
                items.append(RemoteFile(url, info.size, info.version))
            else:
                items.append(next(files))
            names.append(self.labels[row])
            where.append(f"{self.name} line {line}")
            kept.append(row)
        return items, names, where, None if spans is None else spans[kept]


def _inside_folder(path: str, folder: str) -> bool:
    """`Path(path).is_relative_to(folder)` of two resolved paths."""
    return path == folder or path.startswith(folder if folder.endswith("/") else folder + "/")


_MISSING = "to leave missing files out"


class ManifestFormat(DatasetFormat):
    """A manifest format: `auto` picks it for a file (by the file a link resolves to, as the rule checks it) or an
    object whose name ends in `suffix`; its `reader` reads its rows."""

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
        return self.reader(manifest, options.multi_label, options.skip_bad, options.duplicates, inside)

    @staticmethod
    def reader(
        manifest: Path | str, multi_label: bool, skip_bad_rows: bool, duplicates: str, inside: Inside | None
    ) -> Dataset:
        """The manifest's rows as a dataset: each format sets its reader (read_csv, read_jsonl)."""
        raise NotImplementedError
