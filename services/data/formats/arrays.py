"""What every compact column of a dataset's items shares (formats/columns.py: `Files`, a manifest's or an
ImageFolder's local files; formats/members.py: `Members`, WebDataset shards' members; formats/table_rows.py:
`TableRows`, a Hugging Face dataset's rows), so that a million items cost arrays, not a few Python objects each:

- `Column`: a `Sequence` of items built when one is asked for, which formats/build.py stamps, names and takes rows of
  as arrays (`stamps`, `relatives`, `take`) and which pickles as its arrays to the loader processes;
- `Stamps`: each row's stamp as columns (what tells items apart, their size, what says they changed), with `Coded`:
  texts many rows share (a shard's version), each row's index into them;
- `Texts`: many strings in one buffer (names, URLs), `TextsBuilder` gathering them row by row.

Torch-free.
"""

from __future__ import annotations

from abc import abstractmethod
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, overload

import numpy as np

from services.data.formats import remote

T = TypeVar("T")
_ENCODING = ("utf-8", "surrogatepass")  # any str round-trips (file names decoded with surrogateescape too)


class Column(Sequence[T]):
    """Items as arrays: `item(i)` builds item `i` (a `Path`, a `ShardMember`, a `TableRow`) when it is asked for.
    Reads as the list of those items: indexing, slices, iteration, equality with a list of the same items."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def item(self, i: int) -> T:
        """Item `i` (0 <= i < len)."""

    @abstractmethod
    def take(self, rows: np.ndarray) -> Column[T]:
        """The items at `rows` (ascending indices)."""

    @abstractmethod
    def stamps(self, spans: np.ndarray | None) -> Stamps:
        """Each item's stamp (formats/build.py: what tells it from another and says it changed); with `spans`, clips
        of one video are distinct."""

    @abstractmethod
    def relatives(self, root: Path | str) -> Iterator[str]:
        """Each item's name under `root`, as the fingerprint names it (formats/build.py)."""

    def suffixes(self) -> Iterator[str]:
        """Each item's `suffix`."""
        return (item.suffix for item in self)  # type: ignore[attr-defined] - every item answers `suffix`

    @overload
    def __getitem__(self, i: int) -> T: ...

    @overload
    def __getitem__(self, i: slice) -> list[T]: ...

    def __getitem__(self, i: int | slice) -> T | list[T]:
        if isinstance(i, slice):
            return [self.item(k) for k in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        return self.item(int(i) % n)

    def __iter__(self) -> Iterator[T]:
        return (self.item(i) for i in range(len(self)))

    def __eq__(self, other: object) -> bool:  # a list of the same items is the same column
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment] - mutable-looking like the list it stands for

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} items)"


@dataclass(frozen=True)
class Coded:
    """Texts that many rows share: each row's index (`codes`) into `texts`."""

    codes: np.ndarray
    texts: list[str]

    def __getitem__(self, rows: np.ndarray | slice) -> Coded:
        return Coded(self.codes[rows], self.texts)

    def __len__(self) -> int:
        return len(self.codes)

    def tolist(self) -> list[str]:
        return [self.texts[c] for c in self.codes.tolist()]


@dataclass(frozen=True)
class Stamps:
    """Each row's stamp as columns: `same` (rows of one file, and of one span of it, share the number), `size`, and
    `changed`: modification times as uint64 bits (formats/columns.py: `stamp`), texts rows share (`Coded`), or each
    row's text."""

    same: np.ndarray
    size: np.ndarray
    changed: np.ndarray | Coded | list[str]

    def take(self, rows: np.ndarray) -> Stamps:
        changed = [self.changed[i] for i in rows] if isinstance(self.changed, list) else self.changed[rows]
        return Stamps(self.same[rows], self.size[rows], changed)

    def take_slice(self, rows: slice) -> Stamps:
        return Stamps(self.same[rows], self.size[rows], self.changed[rows])

    def changed_texts(self) -> list[str]:
        if isinstance(self.changed, np.ndarray):
            return [str(mtime_ns(t)) for t in self.changed.tolist()]
        return self.changed.tolist() if isinstance(self.changed, Coded) else self.changed


_CHUNK = 8192  # array values turned into Python values at a time


def values(a: np.ndarray) -> Iterator:
    """The values of `a` as Python values, a chunk at a time (`a.tolist()` would hold a million of them at once)."""
    for start in range(0, len(a), _CHUNK):
        yield from a[start : start + _CHUNK].tolist()


def mtime_ns(bits: int) -> int:
    """The modification time a stamp stored as uint64 bits."""
    return bits - (1 << 64) if bits >= 1 << 63 else bits


def same_ids(keys: np.ndarray, spans: np.ndarray | None) -> np.ndarray:
    """A number for each row of `keys` (uint64 or int64 [n, k]; its span too where given) that rows share exactly
    when they are equal. Two columns of non-negative numbers that fit one int64 (a small id and an offset, a device
    and an inode) are that int64, not sorted here: formats/build.py's `each_once` sorts the numbers once."""
    if spans is None and keys.shape[1] == 2 and len(keys):
        major, minor = keys[:, 0], keys[:, 1]
        if (major == major[0]).all() and int(minor.max()) < 1 << 63:  # one device (or file): its inodes (rows)
            return minor.astype(np.int64)
        stride = int(minor.max()) + 1
        if int(major.max()) < (1 << 62) // stride:  # a shard's (file's) id and an offset (row) in it
            return major.astype(np.int64) * stride + minor.astype(np.int64)
    if spans is not None:
        keys = np.concatenate(
            [keys.view(np.uint64), np.ascontiguousarray(spans, dtype=np.float64).view(np.uint64)], axis=1
        )
    if not len(keys):
        return np.empty(0, np.int64)
    return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)


@dataclass(frozen=True)
class Whole:
    """A whole file's stamp: what tells it from another (`same`: device and inode, or the object's URL), its size,
    and what says it changed (its modification time in ns, or the object's version)."""

    same: tuple[int | str, ...]
    size: int
    changed: str


def whole(path: Path | str) -> Whole:
    """The stamp of a local file (links followed) or of an object in a store."""
    if isinstance(path, str):
        info = remote.stat(path, "shard")
        return Whole((path,), info.size, info.version)
    st = path.stat()
    return Whole((st.st_dev, st.st_ino), st.st_size, str(st.st_mtime_ns))


def under(path: Path | str, root: Path | str) -> str:
    """A file's name under `root` (a URL's under a folder URL), or the whole name where it is not under it."""
    if isinstance(path, str):  # a URL
        folder = str(root).rstrip("/") + "/"
        return path.removeprefix(folder)
    return str(path.relative_to(root) if isinstance(root, Path) and path.is_relative_to(root) else path)


class Texts:
    """Strings end to end in one buffer (`data`, UTF-8), `ends` where each ends."""

    def __init__(self, data: bytes, ends: np.ndarray) -> None:
        self.data, self.ends = data, ends

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        start = int(self.ends[i - 1]) if i > 0 else 0
        return self.data[start : int(self.ends[i])].decode(*_ENCODING)

    def __iter__(self) -> Iterator[str]:
        start = 0
        for end in values(self.ends):
            yield self.data[start:end].decode(*_ENCODING)
            start = end

    def take(self, rows: np.ndarray) -> Texts:
        data, ends = take_spans(self.data, self.ends, rows)
        return Texts(data, ends)


def take_spans(data: bytes, ends: np.ndarray, rows: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The pieces `rows` of `data` (each ending at `ends`), end to end, and where each ends."""
    starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
    picked = b"".join(data[s:e] for s, e in zip(values(starts[rows]), values(ends[rows]), strict=True))
    return picked, np.cumsum(ends[rows] - starts[rows], dtype=np.int64)


class TextsBuilder:
    """`Texts` gathered one string at a time."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._ends = array("q")

    def __len__(self) -> int:
        return len(self._ends)

    def append(self, text: str) -> None:
        self._data += text.encode(*_ENCODING)
        self._ends.append(len(self._data))

    def build(self) -> Texts:
        """The texts; the builder is empty after."""
        ends = np.frombuffer(self._ends, dtype=np.int64) if len(self._ends) else np.empty(0, np.int64)
        out = Texts(bytes(self._data), ends)
        self._data, self._ends = bytearray(), array("q")
        return out


def sequence(values: array, dtype: type) -> np.ndarray:
    """An `array` built row by row as a numpy array (not copied; empty arrays too)."""
    return np.frombuffer(values, dtype=dtype) if len(values) else np.empty(0, dtype)
