"""Arrow and Parquet files read in place with pyarrow (installed with the `hf` extra, which pulls in `datasets`): a
Hugging Face dataset's columns listed when it is planned (`arrow_columns`, `parquet_columns`: the label column and
each row's image as "holds bytes" and its recorded name, never the image bytes where the file's statistics tell),
and one image read by a loader process (`read_cell`, what `TableRow.read_bytes` calls).

An Arrow file (`save_to_disk`'s, or the Hub's download) is memory-mapped, so a row's bytes are read from the page
cache without copying the file; a Parquet file is read a row group at a time (its pages are compressed), the last
few kept per process, so that a loader decoding consecutive rows decodes each group once. Both are cached by file
and (size, modification time), so a file replaced since is read again. `parquet_columns` takes an open
`ParquetFile`, local or over an object in a store (formats/store_tables.py), so that both are planned alike. pyarrow
is imported here only: the API process imports it when it plans a job on such a dataset, never at startup.
Torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from storage.faults import is_store_outage

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq


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


@dataclass(frozen=True)
class Columns:
    """What planning reads of a table: its schema, the column its images (or videos) are in, whether each row holds
    their bytes (`has`), the file name each records (`stored`, null without one) and the label column."""

    schema: pa.Schema
    column: str
    has: np.ndarray
    stored: pa.ChunkedArray
    labels: pa.ChunkedArray


def media_column(names: list[str], column: str) -> str:
    """`column`; or, where it is left at `image` and the table has no `image` column but a `video` one (what the
    `datasets` library names a `Video` feature's column), `video`."""
    return "video" if column == "image" and "image" not in names and "video" in names else column


def check_column(names: list[str], name: str, option: str, where: object) -> None:
    if name not in names:
        raise TableError(
            f"{where} has no column {name!r} (dataset.huggingface.{option}); its columns: {', '.join(names)}"
        )


def image_cells(col: pa.ChunkedArray, where: object, column: str) -> tuple[np.ndarray, pa.ChunkedArray]:
    """For each row: whether it holds the image's bytes, and the file name it records (null without one)."""
    import pyarrow as pa

    has: list[np.ndarray] = []
    stored: list[pa.Array] = []
    for chunk in col.chunks:
        if pa.types.is_struct(chunk.type) and chunk.type.get_field_index("bytes") >= 0:
            children = dict(zip([f.name for f in chunk.type], chunk.flatten(), strict=True))  # parents' nulls applied
            has.append(children["bytes"].is_valid().to_numpy(zero_copy_only=False))
            paths = children.get("path")
            stored.append(
                paths.cast(pa.large_string()) if paths is not None else pa.nulls(len(chunk), pa.large_string())
            )
        elif pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type):
            has.append(chunk.is_valid().to_numpy(zero_copy_only=False))
            stored.append(pa.nulls(len(chunk), pa.large_string()))
        else:
            raise TableError(
                f"{where}: column {column!r} holds {chunk.type}, not images (an Image feature, or binary); set "
                "dataset.huggingface.image_column"
            )
    return (np.concatenate(has) if has else np.zeros(0, bool)), pa.chunked_array(stored, pa.large_string())


def arrow_columns(file: Path, image_column: str, label_column: str) -> Columns:
    """`Columns` of an Arrow file, memory-mapped."""
    table = arrow_table(file)
    image_column = media_column(table.schema.names, image_column)
    check_column(table.schema.names, image_column, "image_column", file)
    check_column(table.schema.names, label_column, "label_column", file)
    has, stored = image_cells(table.column(image_column), file, image_column)
    return Columns(table.schema, image_column, has, stored, table.column(label_column))


def _no_nulls(meta: pq.FileMetaData, leaf: str) -> bool:
    """Whether the statistics of every row group say column `leaf` (`image.bytes`, `image`) holds no null."""
    if meta.num_row_groups == 0:
        return True
    group = meta.row_group(0)
    j = next((j for j in range(meta.num_columns) if group.column(j).path_in_schema == leaf), None)
    if j is None:
        return False
    stats = [meta.row_group(g).column(j).statistics for g in range(meta.num_row_groups)]
    return all(s is not None and s.has_null_count and s.null_count == 0 for s in stats)


def _names_only(pf: pq.ParquetFile, column: str) -> str | None:
    """Where the footer's statistics say every row of image column `column` holds bytes: the column of the names
    they record (`image.path`; "" for none), so that planning reads no image; None where it cannot tell."""
    import pyarrow as pa

    kind, meta = pf.schema_arrow.field(column).type, pf.metadata
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and _no_nulls(meta, f"{column}.bytes"):
        return f"{column}.path" if kind.get_field_index("path") >= 0 else ""
    if (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)) and _no_nulls(meta, column):
        return ""
    return None


def _names(table: pa.Table, column: str) -> pa.ChunkedArray:
    """The names `_names_only` read of image column `column` (nulls where it read none)."""
    import pyarrow as pa

    if column not in table.column_names:
        return pa.chunked_array([pa.nulls(table.num_rows, pa.large_string())])
    names = table.column(column).combine_chunks()
    if pa.types.is_struct(names.type):  # pyarrow versions differ: the struct of the one field, or the field
        names = names.flatten()[0]
    return pa.chunked_array([names.cast(pa.large_string())])


def parquet_columns(pf: pq.ParquetFile, where: object, image_column: str, label_column: str) -> Columns:
    """`Columns` of an open Parquet file (`where` names it): its label column and image column's names read by
    column projection in one read where the footer's statistics say every row holds its image's bytes, else the
    image column a row group at a time (one group's image bytes in memory, not the file's); formats/store_tables.py
    opens one in a store. A store's outage is raised as it comes, for the caller to retry; another unreadable file
    is TableError."""
    import pyarrow as pa

    try:
        schema = pf.schema_arrow
        image_column = media_column(schema.names, image_column)
        check_column(schema.names, image_column, "image_column", where)
        check_column(schema.names, label_column, "label_column", where)
        names = _names_only(pf, image_column)
        if names is not None:
            table = pf.read(columns=[label_column, names] if names else [label_column])
            has = np.ones(table.num_rows, bool)
            return Columns(schema, image_column, has, _names(table, image_column), table.column(label_column))
        groups = [
            image_cells(pf.read_row_group(g, columns=[image_column]).column(0), where, image_column)
            for g in range(pf.num_row_groups)
        ]
        has = np.concatenate([h for h, _ in groups]) if groups else np.zeros(0, bool)
        stored = pa.chunked_array([c for _, s in groups for c in s.chunks], pa.large_string())
        return Columns(schema, image_column, has, stored, pf.read(columns=[label_column]).column(0))
    except (OSError, ValueError) as e:
        if is_store_outage(e):
            raise
        raise TableError(f"{where}: cannot read its columns ({e})") from None


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
