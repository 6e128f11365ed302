"""Arrow and Parquet files read in place with pyarrow (installed with the `hf` extra, which pulls in `datasets`): a
Hugging Face dataset's rows listed when it is planned (`arrow_table`, `parquet_column`), and one image read by a
loader process (`read_cell`, what `TableRow.read_bytes` calls).

An Arrow file (`save_to_disk`'s, or the Hub's download) is memory-mapped, so a row's bytes are read from the page
cache without copying the file; a Parquet file is read a row group at a time (its pages are compressed), the last
few kept per process, so that a loader decoding consecutive rows decodes each group once. Both are cached by file
and (size, modification time), so a file replaced since is read again. pyarrow is imported here only: the API
process imports it when it plans a job on such a dataset, never at startup. Torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa


class TableError(Exception):
    """A file or a row that cannot be read; the message says why (the callers name the file or row)."""


def _stamp(file: Path) -> tuple[int, int]:
    st = os.stat(file)
    return st.st_size, st.st_mtime_ns


@lru_cache(maxsize=16)
def _arrow(file: str, stamp: tuple[int, int]) -> pa.Table:
    import pyarrow as pa

    source = pa.memory_map(file)
    try:  # `datasets` writes the IPC stream format; an Arrow file of the random-access format reads too
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(file)).read_all()


def arrow_table(file: Path) -> pa.Table:
    """The Arrow file's table, memory-mapped (nothing is copied until a column is converted)."""
    try:
        return _arrow(str(file), _stamp(file))
    except (OSError, ValueError) as e:  # pyarrow's errors are OSError or ValueError subclasses
        raise TableError(f"{file}: not a readable Arrow file ({e})") from None


@lru_cache(maxsize=16)
def _row_groups(file: str, stamp: tuple[int, int]) -> np.ndarray:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(file).metadata
    return np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])


@lru_cache(maxsize=4)
def _group(file: str, stamp: tuple[int, int], group: int, column: str) -> pa.ChunkedArray:
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).read_row_group(group, columns=[column]).column(0)


def parquet_column(file: Path, column: str) -> pa.ChunkedArray:
    """A column (or a field of one, `image.path`) of a whole Parquet file."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(file, columns=[column]).column(0)
    except (OSError, ValueError) as e:
        raise TableError(f"{file}: cannot read column {column!r} ({e})") from None


def parquet_row_groups(file: Path, column: str) -> Iterator[pa.ChunkedArray]:
    """A column of a Parquet file, a row group at a time."""
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(file)
        for group in range(f.num_row_groups):
            yield f.read_row_group(group, columns=[column]).column(0)
    except (OSError, ValueError) as e:
        raise TableError(f"{file}: cannot read column {column!r} ({e})") from None


def cell_bytes(value: object) -> bytes | None:
    """An image cell's bytes: an Image feature's `{"bytes", "path"}` struct, or a binary column's value."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, bytes) else None


def read_cell(file: Path, row: int, column: str) -> bytes:
    """The bytes of the image in `column` of row `row` of `file`, read in place; TableError saying why not."""
    try:
        stamp = _stamp(file)
        if file.suffix.lower() == ".parquet":
            starts = _row_groups(str(file), stamp)
            group = int(np.searchsorted(starts, row, side="right")) - 1
            if not 0 <= group < len(starts) - 1:
                raise TableError(f"the file has {starts[-1]} rows (it changed since the job was planned)")
            value = _group(str(file), stamp, group, column)[row - int(starts[group])].as_py()
        else:
            table = _arrow(str(file), stamp)
            if row >= table.num_rows:
                raise TableError(f"the file has {table.num_rows} rows (it changed since the job was planned)")
            value = table.column(column)[row].as_py()
    except (OSError, ValueError, KeyError) as e:
        raise TableError(f"cannot be read ({e})") from None
    data = cell_bytes(value)
    if data is None:
        raise TableError(f"column {column!r} holds no image bytes in this row")
    return data
