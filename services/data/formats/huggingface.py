"""Hugging Face datasets (https://huggingface.co/docs/datasets): a `save_to_disk` folder (Arrow files, one `Dataset`
or a `DatasetDict` of splits), Parquet files (one, or a folder of shards as `push_to_hub` and `to_parquet` write them,
split by their names: `train-00000-of-00004.parquet`, `data/validation/...`), an `imagefolder` with a `metadata.csv`
or `metadata.jsonl` (its images, possibly in split folders, named by the metadata's `file_name` column), or a Hub id
(`hf://org/name`). The last two are built by `datasets.load_dataset` (formats/hf_load.py): the Hub's into the
server's Hugging Face cache where the Hub is reachable, the imagefolder's as Arrow files of paths, its images read
from their files.

A row's image is its `image_column` (an `Image` feature's bytes, or a binary column), read in place by the loader
processes (formats/samples.py: `TableRow`; formats/tables.py); a row that records only a file's path (what
`to_parquet` writes for images loaded from files) is read from that file, which services/paths.py's rule checks. Its
label is its `label_column`: a `ClassLabel` (its names are the classes, in their order), a string or integer column
(names as written), or, for multi-label jobs, a list of those (`Sequence(ClassLabel)`).

Splits: with `splits: dataset` (the default) a dataset's own `train`, `validation` and `test` splits are the job's
(Dataset.parts; services/data/splits.py: `split_for`): validation and test are drawn from `train` by the job's
fractions only where the dataset has none; other splits are left out and noted. `splits: draw` pools every split and
draws as for any format.

An imagefolder without metadata (one folder per class) is read by formats/imagefolder.py, as `datasets` reads it.
The `datasets` library is the `hf` extra, imported here only when such a dataset is read (never when the API
starts). Torch-free.
"""

from __future__ import annotations

import os
import re
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from services.data.formats.base import DatasetFormat, Inside, ReadOptions
from services.data.formats.build import finish
from services.data.formats.columns import Labels
from services.data.formats.hf_load import HUB, Splits, library, load_folder, load_hub, metadata_files
from services.data.formats.samples import Dataset, DatasetError
from services.data.formats.table_rows import TableRowsBuilder
from services.data.formats.tables import TableError, arrow_table, parquet_column, parquet_row_groups
from services.data.formats.urls import is_remote

if TYPE_CHECKING:
    import pyarrow as pa

SPLITS = {"train": 0, "validation": 1, "test": 2}  # datasets.Split's names, as our split codes
IN_A_STORE = (
    "a Hugging Face dataset is read from the server's disk (a save_to_disk folder, Parquet files) or the Hub "
    "(`hf://org/name`), not from an object store; copy it under an allowed root, or write it as WebDataset shards"
)
_CHUNK = 8192  # rows turned into Python values at a time
_SPLIT_IN_NAME = re.compile(r"^(train|validation|test)(?:[-_.]|$)")


def is_hub(location: str) -> bool:
    return location.startswith(HUB)


def saved(root: Path) -> bool:
    """Whether `root` is a `save_to_disk` folder."""
    return (root / "dataset_dict.json").is_file() or ((root / "state.json").is_file() and root.is_dir())


def parquet_files(root: Path) -> list[Path]:
    """A Parquet file, or the Parquet files below a folder (sorted; hidden ones left out)."""
    if root.is_file():
        return [root] if root.suffix.lower() == ".parquet" else []
    return sorted(
        p for p in root.rglob("*.parquet") if not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


@dataclass
class _Rows:
    """What is gathered from the files of a dataset: each row's item (formats/table_rows.py: a column), label and
    split code."""

    items: TableRowsBuilder
    names: Labels = field(default_factory=Labels)
    codes: array = field(default_factory=lambda: array("B"))
    skipped: list[str] = field(default_factory=list)
    order: list[str] | None = None


def _split_of(file: Path, root: Path) -> str:
    """A Parquet shard's split by `datasets`' naming: a folder, or a file name starting with the split's name."""
    for part in file.relative_to(root).parts if file.is_relative_to(root) else (file.name,):
        if match := _SPLIT_IN_NAME.match(part):
            return match.group(1)
    return "train"


def _column(table_columns: list[str], name: str, option: str, where: object) -> None:
    if name not in table_columns:
        raise DatasetError(
            f"{where} has no column {name!r} (dataset.huggingface.{option}); its columns: {', '.join(table_columns)}"
        )


def _images(col: pa.ChunkedArray, where: object, column: str) -> tuple[np.ndarray, pa.ChunkedArray]:
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
            raise DatasetError(
                f"{where}: column {column!r} holds {chunk.type}, not images (an Image feature, or binary); set "
                "dataset.huggingface.image_column"
            )
    return (np.concatenate(has) if has else np.zeros(0, bool)), pa.chunked_array(stored, pa.large_string())


def _parquet_images(file: Path, column: str, schema: pa.Schema) -> tuple[np.ndarray, pa.ChunkedArray]:
    """`_images` of a Parquet file, reading only the recorded names where its statistics say every row holds bytes,
    else a row group at a time (one group's image bytes in memory, not the file's)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = schema.field(column).type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and kind.get_field_index("path") >= 0:
        meta = pq.ParquetFile(file).metadata
        leaf = next(
            j for j in range(meta.num_columns) if meta.row_group(0).column(j).path_in_schema == f"{column}.bytes"
        )
        stats = [meta.row_group(g).column(leaf).statistics for g in range(meta.num_row_groups)]
        if all(s is not None and s.has_null_count and s.null_count == 0 for s in stats):
            names = parquet_column(file, f"{column}.path").combine_chunks()
            if pa.types.is_struct(names.type):  # pyarrow versions differ: the struct of the one field, or the field
                names = names.flatten()[0]
            return np.ones(meta.num_rows, bool), pa.chunked_array([names.cast(pa.large_string())])
    groups = [_images(group, file, column) for group in parquet_row_groups(file, column)]
    has = np.concatenate([h for h, _ in groups]) if groups else np.zeros(0, bool)
    return has, pa.chunked_array([c for _, s in groups for c in s.chunks], pa.large_string())


def _label_names(values: list[object], feature: Any, multi: bool) -> list[list[str] | None]:
    """Each row's class names (None where it has no label: a null, or a ClassLabel's -1)."""
    inner = getattr(feature, "feature", feature) if multi else feature
    names = getattr(inner, "names", None)

    def name(v: object) -> str | None:
        if v is None or (names is not None and v == -1):
            return None
        if names is not None and isinstance(v, int):
            return names[v] if 0 <= v < len(names) else None
        return str(v).strip() or None

    out: list[list[str] | None] = []
    for v in values:
        row = [name(t) for t in (v or [])] if multi else [name(v)]
        row = [t for t in row if t is not None]
        out.append(row or None)
    return out


def _read_file(rows: _Rows, file: Path, split: str, options: ReadOptions, root: Path, inside: Inside | None) -> None:
    """Add the rows of one Arrow or Parquet file of `split`."""
    try:
        _read_rows(rows, file, split, options, root, inside)
    except TableError as e:
        raise DatasetError(str(e)) from None


def _read_rows(rows: _Rows, file: Path, split: str, options: ReadOptions, root: Path, inside: Inside | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets, hf = library(), options.huggingface
    if file.suffix.lower() == ".parquet":
        schema = pq.read_schema(file)
        _column(schema.names, hf.image_column, "image_column", file)
        _column(schema.names, hf.label_column, "label_column", file)
        has, stored = _parquet_images(file, hf.image_column, schema)
        labels = parquet_column(file, hf.label_column)
    else:
        table = arrow_table(file)
        schema = table.schema
        _column(schema.names, hf.image_column, "image_column", file)
        _column(schema.names, hf.label_column, "label_column", file)
        has, stored = _images(table.column(hf.image_column), file, hf.image_column)
        labels = table.column(hf.label_column)
    feature = datasets.Features.from_arrow_schema(schema)[hf.label_column]
    multi = pa.types.is_list(labels.type) or pa.types.is_large_list(labels.type)
    if multi and not options.multi_label:
        raise DatasetError(
            f"{file}: column {hf.label_column!r} holds lists of labels; set dataset.multi_label to true to train on "
            "them as tags"
        )
    inner = getattr(feature, "feature", feature) if multi else feature
    if getattr(inner, "names", None) is not None and rows.order is None:
        rows.order = list(inner.names)
    rows.items.add_file(file, split)
    for start in range(0, len(labels), _CHUNK):  # as Python values a chunk at a time: never a million of them
        tags = _label_names(labels.slice(start, _CHUNK).to_pylist(), feature, multi)
        for i, (row_tags, name) in enumerate(zip(tags, stored.slice(start, _CHUNK).to_pylist(), strict=True), start):
            _add_row(rows, i, row_tags, name, bool(has[i]), options, root, inside)


def _add_row(
    rows: _Rows,
    i: int,
    tags: list[str] | None,
    stored: str | None,
    has: bool,
    options: ReadOptions,
    root: Path,
    inside: Inside | None,
) -> None:
    """Row `i` of the file added last: its image's bytes (`has`) or the file it names (`stored`), and its tags."""
    items = rows.items
    path = None
    if not has and stored:  # only a file's path: read from that file, under the rule
        path = Path(stored) if os.path.isabs(stored) else root / stored
        if inside is not None:
            inside(path, _where(items, i))
        if not path.is_file():
            path = None
    problem = "no image (neither bytes nor an existing file)" if not has and path is None else None
    problem = problem or (None if tags else "no label")
    if problem:
        if not options.skip_bad:
            raise DatasetError(f"{_where(items, i)}: {problem} (set dataset.on_corrupt='skip' to leave such rows out)")
        rows.skipped.append(f"{_where(items, i)}: {problem}, left out")
        return
    if path is not None:
        items.add(i, str(path), local=True)
    else:
        items.add(i, stored or "")
    rows.names.append("|".join(tags))
    rows.codes.append(SPLITS.get(items.splits[-1], 0))


def _where(items: TableRowsBuilder, i: int) -> str:
    return f"{items.splits[-1]} row {i} ({items.files[-1].name})"


def _splits_of_saved(root: Path) -> Splits:
    """(split, its Arrow files) of a `save_to_disk` folder or of the Hub's download (`root`: a `load_dataset` id)."""
    datasets = library()
    loaded = datasets.load_from_disk(str(root))
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(str(loaded.split or "train"), loaded)]
    return [(str(name), [Path(c["filename"]) for c in ds.cache_files]) for name, ds in parts]


def read_huggingface(
    location: str, files: list[Path | str], options: ReadOptions | None = None, inside: Inside | None = None
) -> Dataset:
    """The dataset at `location` (`files`: its folder or Parquet file, checked; none for a Hub id). With `inside`,
    every Arrow or Parquet file, and every image file a row names, is checked by it before it is read."""
    options = options or ReadOptions()
    built = True  # the Arrow files are the library's, in its cache: not the user's, so not under the rule
    if is_hub(location):
        root, splits = None, load_hub(location, options.huggingface)
    else:
        (root,) = files
        if isinstance(root, str):  # an object-store URL (services/data/formats/urls.py)
            raise DatasetError(f"{root}: {IN_A_STORE}")
        if saved(root):
            splits, built = _splits_of_saved(root), False
        elif metadata_files(root):
            splits = load_folder(root, inside)
        elif found := parquet_files(root):
            library()
            splits = {}
            for f in found:
                splits.setdefault(_split_of(f, root), []).append(f)
            splits, built = list(splits.items()), False
        else:
            raise DatasetError(
                f"{root} is not a Hugging Face dataset: no `dataset_dict.json` or `state.json` (a save_to_disk "
                "folder), no `metadata.csv` or `metadata.jsonl` (an imagefolder) and no .parquet file"
            )
    return _dataset(location, root, splits, options, inside if root is not None else None, built)


def _base(root: Path | None) -> Path | None:
    """The folder a dataset's relative names are under: its folder, or its Parquet file's."""
    return root if root is None or root.is_dir() else root.parent


def _dataset(
    location: str, root: Path | None, splits: Splits, options: ReadOptions, inside: Inside | None, built: bool
) -> Dataset:
    """The rows of every file of `splits`; with `inside`, each file a row names is checked by it, and each Arrow or
    Parquet file too unless the library `built` it (in its cache, from files checked)."""
    honour = options.huggingface.splits == "dataset"
    names = [s for s, _ in splits]
    if honour and len(splits) > 1 and "train" not in names:
        raise DatasetError(
            f"{location} has no `train` split (its splits: {', '.join(names)}); set dataset.huggingface.splits to "
            "'draw' to pool them and draw the job's split"
        )
    rows = _Rows(TableRowsBuilder(options.huggingface.image_column))
    for split, split_files in splits:
        if honour and len(splits) > 1 and split not in SPLITS:
            rows.skipped.append(f"split {split!r}: not train, validation or test, left out")
            continue
        for file in split_files:
            if inside is not None and not built:
                inside(file, f"{split} file {file.name}")
            _read_file(rows, file, split if honour else "train", options, _base(root) or file.parent, inside)
    top = (
        base
        if (base := _base(root)) is not None
        else Path(os.path.commonpath([f.parent for _, fs in splits for f in fs]))
    )
    codes = np.frombuffer(rows.codes, dtype=np.uint8) if len(rows.codes) else np.zeros(0, np.uint8)
    parts = codes if honour and codes.any() else None
    items = rows.items.build()
    return finish(
        top,
        items,
        rows.names,
        items.where(),
        options.duplicates,
        tuple(rows.skipped),
        None,
        options.multi_label,
        "labels",
        order=rows.order,
        parts=parts,
    )


class HuggingFace(DatasetFormat):
    name = "huggingface"

    def claims(self, location: str) -> bool:
        if is_hub(location):
            return True
        if is_remote(location):  # the store is not listed to tell: only a Parquet file's name says so
            return location.lower().endswith(".parquet")
        try:
            path = Path(location).resolve()
            if path.is_file():
                return path.suffix.lower() == ".parquet"
            # a folder of shards as `push_to_hub` (data/) or `to_parquet` lay them out, or an imagefolder with
            # metadata; not deeper, so that an ImageFolder of a million files is not listed twice
            return (
                saved(path)
                or any(path.glob("*.parquet"))
                or any((path / "data").glob("*.parquet"))
                or bool(metadata_files(path))
            )
        except (OSError, RuntimeError):
            return False

    def locations(self, location: str) -> list[str]:
        return [] if is_hub(location) else [location]

    def read(self, location: str, files: list[Path | str], options: ReadOptions, inside: Inside | None) -> Dataset:
        return read_huggingface(location, files, options, inside)
