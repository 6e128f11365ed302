"""A Hugging Face dataset's rows as a compact column (formats/arrays.py: `Column`): each row's file (an index into
the dataset's Arrow or Parquet files, local or objects in a store) and number in arrays, and the file name it records
in one buffer, so that a million rows cost about 30 bytes each instead of a `TableRow` object (and its strings). A
row that records only an image file's path (no bytes) is that local file, its path in the same buffer. Items are
built when one is asked for (a loader reading a row, a message naming it); the column pickles as its arrays to the
loader processes. Torch-free.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from services.data.formats.arrays import (
    Coded,
    Column,
    Stamps,
    Texts,
    TextsBuilder,
    Whole,
    same_ids,
    sequence,
    under,
    values,
    whole,
)
from services.data.formats.columns import stamp
from services.data.formats.members import base
from services.data.formats.samples import VIDEO_SUFFIXES, Item, Table, TableRow


class TableRows(Column[Item]):
    """Row i: row `row[i]` of `files[file[i]]`, its image in `column`, recording the name `stored[i]`; where
    `local[i]`, the local file `stored[i]` instead. `splits[f]` is the split file f was read as (for messages);
    `objects[f]` the stamp of file f where it is an object in a store (its URL, size and version), None otherwise;
    `videos[f]` whether file f's column is a `Video` feature (its rows are videos whatever names they record)."""

    def __init__(
        self,
        files: list[Table],
        splits: list[str],
        column: str,
        arrays: tuple[np.ndarray, np.ndarray, np.ndarray],
        stored: Texts,
        objects: list[Whole | None] | None = None,
        videos: list[bool] | None = None,
    ) -> None:
        self.files, self.splits, self.column, self.stored = files, splits, column, stored
        self.file, self.row, self.local = arrays
        self.objects = objects or [None] * len(files)
        self.videos = videos or [False] * len(files)

    def __len__(self) -> int:
        return len(self.file)

    def item(self, i: int) -> Item:
        if self.local[i]:
            return Path(self.stored[i])
        return TableRow(self.files[self.file[i]], int(self.row[i]), self.column, self.stored[i])

    def __iter__(self) -> Iterator[Item]:
        rows = zip(values(self.file), values(self.row), values(self.local), self.stored, strict=True)
        return (Path(s) if local else TableRow(self.files[f], r, self.column, s) for f, r, local, s in rows)

    def take(self, rows: np.ndarray) -> TableRows:
        if len(rows) == len(self):
            return self
        arrays = (self.file[rows], self.row[rows], self.local[rows])
        stored = self.stored.take(rows)
        return TableRows(self.files, self.splits, self.column, arrays, stored, self.objects, self.videos)

    def stamps(self, spans: np.ndarray | None) -> Stamps:
        """A table's row by its file (device and inode) and number, with its file's size and modification time; a
        local file by its own (never one of a table's rows): one stat per file. Rows of objects in a store by the
        object's URL and the row's number, with the object's size and version (`objects`: from the listing and the
        footer, nothing asked of the store here)."""
        if any(o is not None for o in self.objects):
            return self._object_stamps(spans)
        ids: dict[tuple[int, int], int] = {}
        by_file = [stamp(os.stat(f)) for f in self.files]
        file_id = np.array([ids.setdefault((s[0], s[1]), len(ids)) for s in by_file], dtype=np.int64)
        major, minor = file_id[self.file], self.row + 1  # a local file's "row" is 0
        size = np.array([s[2] for s in by_file], dtype=np.int64)[self.file]
        changed = np.array([s[3] for s in by_file], dtype=np.uint64)[self.file]
        for i in np.flatnonzero(self.local).tolist():
            dev, ino, size[i], changed[i] = stamp(os.stat(self.stored[i]))
            major[i], minor[i] = ids.setdefault((dev, ino), len(ids)), 0
        return Stamps(same_ids(np.stack([major, minor], axis=1), spans), size, changed)

    def _object_stamps(self, spans: np.ndarray | None) -> Stamps:
        objects = [o if o is not None else whole(f) for f, o in zip(self.files, self.objects, strict=True)]
        ids: dict[tuple[int | str, ...], int] = {}
        file_id = np.array([ids.setdefault(o.same, len(ids)) for o in objects], dtype=np.int64)
        size = np.array([o.size for o in objects], dtype=np.int64)[self.file]
        keys = np.stack([file_id[self.file], self.row], axis=1)
        return Stamps(same_ids(keys, spans), size, Coded(self.file, [o.changed for o in objects]))

    def relatives(self, root: Path | str) -> Iterator[str]:
        folders = [under(f, root) for f in self.files]
        rows = zip(values(self.file), values(self.row), values(self.local), self.stored, strict=True)
        for f, r, local, s in rows:
            yield under(Path(s), root) if local else f"{folders[f]}[{r}]"

    def suffixes(self) -> Iterator[str]:
        """Each row's recorded name's suffix; a row of a `Video` feature recording none of a video's, `.mp4` (the
        kind is all `media_kind` reads of it: a clip is decoded from its bytes, whatever its container)."""
        for f, s in zip(values(self.file), self.stored, strict=True):
            suffix = Path(s).suffix
            yield ".mp4" if self.videos[f] and suffix.lower() not in VIDEO_SUFFIXES else suffix

    def where(self) -> Where:
        """How messages name each row: `<split> row <n> (<file's name>)`."""
        return Where(self)


class Where(Sequence[str]):
    """`<split> row <n> (<file>)` for each row of a column, made when a message needs it."""

    def __init__(self, rows: TableRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> str:  # type: ignore[override] - rows, not slices
        f = self.rows.file[i]
        return f"{self.rows.splits[f]} row {self.rows.row[i]} ({base(self.rows.files[f])})"


class TableRowsBuilder:
    """`TableRows` gathered file by file (`add_file`), then row by row."""

    def __init__(self, column: str) -> None:
        self.column = column
        self.files: list[Table] = []
        self.splits: list[str] = []
        self.objects: list[Whole | None] = []
        self.videos: list[bool] = []
        self._file = array("i")
        self._row = array("q")
        self._local = array("B")
        self._stored = TextsBuilder()

    def __len__(self) -> int:
        return len(self._file)

    def add_file(self, file: Table, split: str, stamp: Whole | None = None, video: bool = False) -> None:
        """The file the rows added next are of, read as `split`; `stamp`: an object's in a store; `video`: its
        column is a `Video` feature."""
        self.files.append(file)
        self.splits.append(split)
        self.objects.append(stamp)
        self.videos.append(video)

    def add(self, row: int, stored: str, local: bool = False) -> None:
        """Row `row` of the last file added, recording the name `stored`; or (`local`) the local file `stored`."""
        self._file.append(len(self.files) - 1)
        self._row.append(row)
        self._local.append(local)
        self._stored.append(stored)

    def build(self) -> TableRows:
        local = sequence(self._local, np.uint8).astype(bool)
        arrays = (sequence(self._file, np.int32), sequence(self._row, np.int64), local)
        stored = self._stored.build()
        return TableRows(self.files, self.splits, self.column, arrays, stored, self.objects, self.videos)
