"""A Hugging Face dataset's Parquet files in an object store (`s3://bucket/ds/`, a folder of shards as `push_to_hub`
and `to_parquet` lay them out, or one `s3://bucket/ds/train.parquet`), read where they are through fsspec
(formats/remote.py: retried, scrubbed), never staged on local disk:

- listing (`parquet_objects`): the folder's `.parquet` objects with their sizes and ETags, one listing;
- planning (`read_columns`): each object opened as a file read by ranges (no read-ahead: pyarrow asks for what it
  needs) and read by pyarrow's column projection (formats/tables.py: `parquet_columns`): its footer, its label
  column and its images' recorded names, never the images' bytes where the footer's statistics say every row holds
  them. Its version (the fingerprint's) is its ETag and size with the footer's row count, row groups and size;
- loading (`read_cell`, what `TableRow.read_bytes` calls for an object): a row's image read with its row group's
  image column chunk (one ranged request, pyarrow's reads of the chunk coalesced), the footer read once and the last
  few groups kept per process, so that a loader decoding consecutive rows fetches each group once.

A store outage is retried within the read (`remote.call`), then StoreUnavailable names the object; the task layer
then retries the step, so a lasting outage fails the job naming it. Torch-free; pyarrow imported when one is read.
"""

from __future__ import annotations

import posixpath
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Generic, TypeVar

import fsspec
import numpy as np
from fsspec.spec import AbstractBufferedFile

from services.data.formats import remote
from services.data.formats.remote import ObjectInfo
from services.data.formats.tables import Columns, TableError, cell_bytes, parquet_columns
from storage.faults import is_store_outage

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

T = TypeVar("T")
WHAT = "Parquet file"  # how messages name an object read here


class NoParquet(Exception):
    """A store location holding no Parquet object; the message says so."""


def parquet_objects(location: str) -> dict[str, ObjectInfo]:
    """The Parquet object `location` names (a URL ending in `.parquet`), or those below the folder URL `location`
    (sorted, hidden ones left out), with their sizes and versions; NoParquet if there are none."""
    if location.lower().endswith(".parquet"):
        try:
            return {location: remote.stat(location, WHAT)}
        except FileNotFoundError:
            raise NoParquet(f"{location} does not exist") from None
    folder = location.rstrip("/")

    def find(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, ObjectInfo]:
        found = fs.find(path.rstrip("/"), detail=True)
        scheme = folder.partition("://")[0]
        out = {}
        for name, entry in sorted(found.items()):
            url = f"{scheme}://{name}"
            rel = url.removeprefix(folder + "/")
            if entry.get("type") == "directory" or not rel.lower().endswith(".parquet") or rel == url:
                continue
            if not any(part.startswith(".") for part in rel.split("/")):
                out[url] = remote.info_of(entry)
        return out

    objects = remote.call(folder, "dataset folder", find)
    if not objects:
        raise NoParquet(
            f"{location} holds no .parquet object; in an object store a Hugging Face dataset is its Parquet files "
            "(as `push_to_hub` and `to_parquet` write them): a save_to_disk folder or an imagefolder is read from "
            "the server's disk"
        )
    return objects


def split_path(url: str, folder: str) -> list[str]:
    """The parts of `url`'s key under the folder URL `folder` (none where it is `folder`, its name alone where it
    is not under it), as `Path.relative_to` gives a local file's."""
    if url == folder:
        return []
    rel = url.removeprefix(folder.rstrip("/") + "/")
    return rel.split("/") if rel != url else [posixpath.basename(url)]


def _open(fs: fsspec.AbstractFileSystem, path: str, details: dict | None) -> IO[bytes]:
    """The object as a file read by exactly the ranges asked for. With its `details` (its size, and what the
    filesystem's files know of an object: s3fs's the ETag, which it then checks against each answer) the store is
    not asked for them (s3fs asks at a file's first read otherwise: a HEAD request)."""
    if details is None:
        return fs.open(path, "rb", cache_type="none")
    try:
        f = fs.open(path, "rb", cache_type="none", size=details["size"])
    except TypeError:  # a filesystem whose files take no size
        return fs.open(path, "rb", cache_type="none")
    if isinstance(f, AbstractBufferedFile):
        f.details = details
    return f


def _parquet(f: IO[bytes], url: str, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
    import pyarrow.parquet as pq

    with _table_errors(url, "not a readable Parquet file"):  # pre_buffer: a read's column chunks fetched together
        return pq.ParquetFile(f, metadata=metadata, pre_buffer=True)


@contextmanager
def _table_errors(url: str, what: str) -> Iterator[None]:
    """pyarrow's errors reading the object as TableError naming it; the store's outages (which pyarrow passes on as
    they came from the file) and a missing object stay themselves, for `remote.call` to retry or name."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        if is_store_outage(e):
            raise
        raise TableError(f"{url}: {what} ({e})") from None


def read_columns(url: str, info: ObjectInfo, image_column: str, label_column: str) -> tuple[Columns, str]:
    """The object's `Columns` (formats/tables.py) and its version: its ETag and size with its footer's row count,
    row groups and size; TableError naming it if it is no Parquet file or lacks a column."""

    def read(fs: fsspec.AbstractFileSystem, path: str) -> tuple[Columns, str]:
        with _open(fs, path, {"name": path, "size": info.size}) as f:
            pf = _parquet(f, url)
            meta = pf.metadata
            version = f"{info.version}:{info.size}:{meta.num_rows}x{meta.num_row_groups}:{meta.serialized_size}"
            return parquet_columns(pf, url, image_column, label_column), version

    try:
        return remote.call(url, WHAT, read, keep=(TableError,))
    except FileNotFoundError:
        raise TableError(f"{url}: the object no longer exists") from None


class _Kept(Generic[T]):
    """The last `size` values of `load(*key)`, each loaded once even when several threads (a loader's decoding
    threads) ask for it at once: the others wait for the first's request rather than making their own."""

    def __init__(self, size: int, load: Callable[..., T]) -> None:
        self.size, self.load = size, load
        self._values: OrderedDict[tuple, T] = OrderedDict()
        self._loading: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()

    def __call__(self, *key: object) -> T:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                if key in self._values:
                    return self._values[key]
            try:
                value = self.load(*key)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                self._values[key] = value
                while len(self._values) > self.size:
                    self._values.popitem(last=False)
            return value

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


def _read_footer(url: str) -> tuple[pq.FileMetaData, dict | None, np.ndarray]:
    """The object's footer, details (`_open`) and each row group's first row (and the row
    count last)."""

    def read(fs: fsspec.AbstractFileSystem, path: str) -> tuple[pq.FileMetaData, dict | None, np.ndarray]:
        with _open(fs, path, None) as f:
            meta = _parquet(f, url).metadata
            details = dict(f.details) if isinstance(f, AbstractBufferedFile) else None
        starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        return meta, details, starts

    return remote.call(url, WHAT, read, keep=(TableError,))


def _read_group(url: str, group: int, column: str) -> pa.ChunkedArray:
    meta, details, _ = _footer(url)

    def read(fs: fsspec.AbstractFileSystem, path: str) -> pa.ChunkedArray:
        with _open(fs, path, details) as f, _table_errors(url, f"row group {group} cannot be read"):
            return _parquet(f, url, meta).read_row_group(group, columns=[column]).column(0)

    return remote.call(url, WHAT, read, keep=(TableError,))


_footer = _Kept(16, _read_footer)
_group = _Kept(4, _read_group)


def read_cell(url: str, row: int, column: str) -> bytes:
    """The bytes of the image in `column` of row `row` of the Parquet object `url`, read with its row group in place;
    TableError saying why not (FileNotFoundError if the object is gone, StoreUnavailable naming it if the store does
    not answer, after retries)."""
    _, _, starts = _footer(url)
    group = int(np.searchsorted(starts, row, side="right")) - 1
    if not 0 <= group < len(starts) - 1:
        _footer.clear()  # replaced since: read its footer again next time
        raise TableError(f"the file has {starts[-1]} rows (it changed since the job was planned)")
    value = _group(url, group, column)[row - int(starts[group])].as_py()
    data = cell_bytes(value)
    if data is None:
        raise TableError(f"column {column!r} holds no image bytes in this row")
    return data


def clear() -> None:
    """Forget the footers and row groups kept in this process."""
    _footer.clear()
    _group.clear()
