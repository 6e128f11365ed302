"""A dataset's rows as compact columns, so that reading a million rows holds tens of bytes per row instead of a few
Python objects (a `Path` and its parts, a label string, a message string: about a kilobyte a row):

- `Files`: local files as one buffer of their encoded names with offsets, and each file's stat where the format took
  it while reading (one `lstat` a row: formats/manifest_rows.py, formats/imagefolder.py); a `Column` of `Path`s
  (formats/arrays.py), so the loaders, the planner and the messages read it as they read a list of paths, and it
  pickles as two arrays to the loader processes;
- `Labels`: each row's label as an index into the distinct labels;
- `Lines`: how messages name a row (`<manifest> line <n>`), made when a message needs it;
- `Resolver`: `os.path.realpath` of many files under few folders, each folder resolved once and each file by one
  `lstat` (a link followed as `realpath` follows it).

Torch-free.
"""

from __future__ import annotations

import os
import stat
from array import array
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from services.data.formats.arrays import Column, Stamps, same_ids, take_spans, values


class Files(Column[Path]):
    """Local files: `names` (each path `os.fsencode`d, end to end, after the `prefix` every path starts with: an
    ImageFolder's folder, written once) and `ends` (where each ends in it). `stats`: uint64 [n, 4] of (st_dev,
    st_ino, st_size, st_mtime_ns) of the file a path reaches (links followed), or None until `with_stats` takes
    them."""

    def __init__(self, names: bytes, ends: np.ndarray, stats: np.ndarray | None = None, prefix: str = "") -> None:
        self.names, self.ends, self.stats, self.prefix = names, ends, stats, prefix

    @classmethod
    def of(cls, paths: Sequence[Path | str]) -> Files:
        encoded = [os.fsencode(str(p)) for p in paths]
        return cls(b"".join(encoded), np.cumsum([len(e) for e in encoded], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ends)

    def text(self, i: int) -> str:
        """Path `i` as a str (what `str(self[i])` is), without building the Path."""
        start = int(self.ends[i - 1]) if i > 0 else 0
        return self.prefix + os.fsdecode(self.names[start : int(self.ends[i])])

    def texts(self) -> Iterator[str]:
        start, prefix = 0, self.prefix
        for end in values(self.ends):
            yield prefix + os.fsdecode(self.names[start:end])
            start = end

    def item(self, i: int) -> Path:
        return Path(self.text(i))

    def __iter__(self) -> Iterator[Path]:
        return (Path(t) for t in self.texts())

    def __eq__(self, other: object) -> bool:  # a list of the same paths is the same column
        if isinstance(other, Files) and other.prefix == self.prefix:
            return self.names == other.names and np.array_equal(self.ends, other.ends)
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment] - mutable-looking like the list it stands for

    def __repr__(self) -> str:
        return f"Files({len(self)} files)"

    def take(self, rows: np.ndarray) -> Files:
        """The files at `rows` (ascending indices), with their stats."""
        if len(rows) == len(self):
            return self
        names, ends = take_spans(self.names, self.ends, rows)
        return Files(names, ends, None if self.stats is None else self.stats[rows], self.prefix)

    def with_stats(self) -> Files:
        """These files with the stat of each (links followed, as `Path.stat()`); OSError for one that is gone."""
        if self.stats is not None:
            return self
        stats = np.empty((len(self), 4), dtype=np.uint64)
        for i, text in enumerate(self.texts()):
            stats[i] = stamp(os.stat(text))
        return Files(self.names, self.ends, stats, self.prefix)

    def without_stats(self) -> Files:
        """These files without their stats (what a dataset read keeps: only its fingerprint needed them)."""
        return Files(self.names, self.ends, None, self.prefix)

    def stamps(self, spans: np.ndarray | None) -> Stamps:
        """The files by device and inode, their sizes and modification times (from their stats, `with_stats`)."""
        st = self.with_stats().stats
        return Stamps(same_ids(st[:, :2], spans), st[:, 2].astype(np.int64), st[:, 3])

    def relatives(self, root: Path | str) -> Iterator[str]:
        """Each file's name under `root`, as `Path.relative_to` writes it, without building its Path."""
        if not isinstance(root, Path):
            yield from self.texts()
            return
        top = str(root)
        prefix = top if top.endswith("/") else top + "/"
        for text in self.texts():
            yield text[len(prefix) :] if text.startswith(prefix) else "." if text == top else text

    def suffixes(self) -> Iterator[str]:
        """Each file's `Path.suffix`."""
        for text in self.texts():
            name = text.rsplit("/", 1)[-1]
            dot = name.rfind(".")
            yield name[dot:] if 0 < dot < len(name) - 1 else ""

    def where(self) -> FileNames:
        """How messages name each file: its path."""
        return FileNames(self)


class FileNames(Sequence[str]):
    """Each file's path as a str: how an ImageFolder's messages name a file."""

    def __init__(self, files: Files) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> str:  # type: ignore[override] - rows, not slices
        return self.files.text(i)


def stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    """What `Files.stats` holds of a file's stat; the modification time as uint64 bits (a time before 1970 too)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns & 0xFFFF_FFFF_FFFF_FFFF


class FilesBuilder:
    """`Files` built row by row from resolved paths and their stats, in arrays (no Python object kept a row); every
    path starts with `prefix` (a folder's path ending in its separator, or nothing)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self._names = bytearray()
        self._ends = array("q")
        self._stats = array("Q")

    def __len__(self) -> int:
        return len(self._ends)

    def add(self, path: str, st: os.stat_result) -> None:
        if not path.startswith(self.prefix):
            raise ValueError(f"{path!r} does not start with {self.prefix!r}")
        self._names += os.fsencode(path[len(self.prefix) :])
        self._ends.append(len(self._names))
        self._stats.extend(stamp(st))

    def build(self) -> Files:
        """The column; the builder is empty after (its arrays are the column's, not copied)."""
        names, ends, stats = bytes(self._names), self._ends, self._stats
        self._names, self._ends, self._stats = bytearray(), array("q"), array("Q")  # those now are the column's
        if not len(ends):
            return Files(b"", np.empty(0, np.int64), np.empty((0, 4), np.uint64), self.prefix)
        stats_array = np.frombuffer(stats, dtype=np.uint64).reshape(-1, 4)
        return Files(names, np.frombuffer(ends, dtype=np.int64), stats_array, self.prefix)


class Labels(Sequence[str]):
    """Each row's label as an index (`codes`) into the distinct labels (`names`), as they came."""

    def __init__(self) -> None:
        self._codes = array("q")
        self.names: list[str] = []
        self._index: dict[str, int] = {}

    @classmethod
    def of(cls, labels: Sequence[str]) -> Labels:
        out = cls()
        for label in labels:
            out.append(label)
        return out

    def append(self, label: str) -> None:
        code = self._index.get(label)
        if code is None:
            code = self._index[label] = len(self.names)
            self.names.append(label)
        self._codes.append(code)

    @property
    def codes(self) -> np.ndarray:
        return np.frombuffer(self._codes, dtype=np.int64) if len(self._codes) else np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self._codes)

    def __getitem__(self, i: int) -> str:  # type: ignore[override] - rows, not slices
        return self.names[self._codes[i]]


class Lines(Sequence[str]):
    """`<name> line <n>` for each row's line `n`: how a manifest's messages name a row."""

    def __init__(self, name: str, lines: Sequence[int]) -> None:
        self.name, self.lines = name, lines

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> str:  # type: ignore[override] - rows, not slices
        return f"{self.name} line {self.lines[i]}"


class Resolver:
    """`os.path.realpath` (what `Path.resolve()` does) of files, with each folder resolved once: a file that is no
    link is its real folder and its name, one `lstat` that also gives its stat; a link is resolved whole."""

    def __init__(self, folders: int = 4096) -> None:
        self._folder = lru_cache(maxsize=folders)(os.path.realpath)

    def resolve(self, path: str) -> tuple[str, os.stat_result | None]:
        """(the real path, the stat of what it reaches, or None where nothing is there)."""
        folder, name = os.path.split(path)
        if name in ("", ".", ".."):
            return _followed(os.path.realpath(path))
        real = os.path.join(self._folder(folder or "."), name)
        try:
            st = os.lstat(real)
        except OSError:  # missing (realpath keeps a name it cannot look up, and so does this)
            return real, None
        return _followed(os.path.realpath(real)) if stat.S_ISLNK(st.st_mode) else (real, st)


def _followed(real: str) -> tuple[str, os.stat_result | None]:
    try:
        return real, os.stat(real)
    except OSError:
        return real, None


def is_file(st: os.stat_result | None) -> bool:
    """Whether a `Resolver` stat is a regular file (`Path.is_file()`)."""
    return st is not None and stat.S_ISREG(st.st_mode)
