"""Hugging Face datasets (https://huggingface.co/docs/datasets): a `save_to_disk` folder (Arrow files, one `Dataset`
or a `DatasetDict` of splits), Parquet files (one, or a folder of shards as `push_to_hub` and `to_parquet` write them,
split by their names: `train-00000-of-00004.parquet`, `data/validation/...`), an `imagefolder` with a `metadata.csv`
or `metadata.jsonl` (its images, possibly in split folders, named by the metadata's `file_name` column), or a Hub id
(`hf://org/name`). The last two are built by `datasets.load_dataset` (formats/hf_load.py): the Hub's into the
server's Hugging Face cache where the Hub is reachable, the imagefolder's as Arrow files of paths, its images read
from their files. Parquet files may be in an object store too (`s3://bucket/ds/`, a folder URL ending in `/`, or
`s3://bucket/ds/train.parquet`; under the allowed prefixes), read where they are by formats/store_tables.py: planning
reads their footers and label columns, the loaders each row's image with its row group; such rows hold their bytes.

A row's image is its `image_column` (an `Image` feature's bytes, or a binary column), read in place by the loader
processes (formats/samples.py: `TableRow`; formats/tables.py); a row that records only a file's path (what
`to_parquet` writes for images loaded from files) is read from that file, which services/paths.py's rule checks. A
row's video likewise: a `Video` feature's column (`video`, read where `image_column` is left at `image` and the
dataset has no such column), its rows clips whatever names they record, or any column whose rows record video names
(`.mp4`, ...), the dataset then a video one (services/modality/). Its
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
from typing import Any

import numpy as np

from services.data.formats import remote
from services.data.formats.arrays import Whole
from services.data.formats.base import DatasetFormat, Inside, ReadOptions
from services.data.formats.build import finish
from services.data.formats.columns import Labels
from services.data.formats.hf_load import HUB, Splits, library, load_folder, load_hub, metadata_files
from services.data.formats.left_out import NO_IMAGE, NO_LABEL, SPLIT, Notes
from services.data.formats.members import base
from services.data.formats.remote import ObjectInfo
from services.data.formats.samples import Dataset, DatasetError, Table
from services.data.formats.store_tables import NoParquet, parquet_objects, read_columns, split_path
from services.data.formats.table_rows import TableRowsBuilder
from services.data.formats.tables import Columns, TableError, arrow_columns, parquet_columns
from services.data.formats.urls import is_remote

SPLITS = {"train": 0, "validation": 1, "test": 2}  # datasets.Split's names, as our split codes
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
    split code; for objects in a store, each one's size and ETag from the listing (`objects`) and its version once
    read (`versions`: formats/store_tables.py's `read_columns`)."""

    items: TableRowsBuilder
    names: Labels = field(default_factory=Labels)
    codes: array = field(default_factory=lambda: array("B"))
    skipped: Notes = field(default_factory=Notes)
    order: list[str] | None = None
    objects: dict[str, ObjectInfo] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def stamp(self, file: Table) -> Whole | None:
        """An object's stamp (its URL, size and version); None for a local file, which is stat'ed."""
        return Whole((file,), self.objects[file].size, self.versions[file]) if isinstance(file, str) else None


def _split_of(file: Table, root: Path | str) -> str:
    """A Parquet shard's split by `datasets`' naming: a folder, or a file name starting with the split's name."""
    if isinstance(file, str):
        parts = split_path(file, str(root))
    else:
        parts = file.relative_to(root).parts if file.is_relative_to(root) else (file.name,)
    for part in parts:
        if match := _SPLIT_IN_NAME.match(part):
            return match.group(1)
    return "train"


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


def _read_file(
    rows: _Rows, file: Table, split: str, options: ReadOptions, root: Path | None, inside: Inside | None
) -> None:
    """Add the rows of one Arrow or Parquet file of `split` (a local file, or an object in a store)."""
    try:
        _read_rows(rows, file, split, options, root, inside)
    except TableError as e:
        raise DatasetError(str(e)) from None


def _columns(rows: _Rows, file: Table, options: ReadOptions) -> Columns:
    """What planning reads of `file` (formats/tables.py: `Columns`); an object's version recorded in `rows`."""
    import pyarrow.parquet as pq

    hf = options.huggingface
    if isinstance(file, str):
        columns, rows.versions[file] = read_columns(file, rows.objects[file], hf.image_column, hf.label_column)
        return columns
    if file.suffix.lower() != ".parquet":
        return arrow_columns(file, hf.image_column, hf.label_column)
    try:
        pf = pq.ParquetFile(file)
    except (OSError, ValueError) as e:
        raise TableError(f"{file}: not a readable Parquet file ({e})") from None
    return parquet_columns(pf, file, hf.image_column, hf.label_column)


def _read_rows(
    rows: _Rows, file: Table, split: str, options: ReadOptions, root: Path | None, inside: Inside | None
) -> None:
    import pyarrow as pa

    datasets, hf = library(), options.huggingface
    columns = _columns(rows, file, options)
    labels, stored, has = columns.labels, columns.stored, columns.has
    features = datasets.Features.from_arrow_schema(columns.schema)
    feature, media = features[hf.label_column], features[columns.column]
    multi = pa.types.is_list(labels.type) or pa.types.is_large_list(labels.type)
    if multi and not options.multi_label:
        raise DatasetError(
            f"{file}: column {hf.label_column!r} holds lists of labels; set dataset.multi_label to true to train on "
            "them as tags"
        )
    inner = getattr(feature, "feature", feature) if multi else feature
    if getattr(inner, "names", None) is not None and rows.order is None:
        rows.order = list(inner.names)
    video = getattr(datasets, "Video", None)  # a Video feature's rows are clips whatever names they record
    rows.items.column = columns.column  # `video` where `image` was left to its default (tables.py: media_column)
    rows.items.add_file(file, split, rows.stamp(file), video is not None and isinstance(media, video))
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
    root: Path | None,
    inside: Inside | None,
) -> None:
    """Row `i` of the file added last: its image's bytes (`has`) or the file it names (`stored`, under `root`; none
    for a dataset in a store, whose rows hold their bytes), and its tags."""
    items = rows.items
    path = None
    if not has and stored and root is not None:  # only a file's path: read from that file, under the rule
        path = Path(stored) if os.path.isabs(stored) else root / stored
        if inside is not None:
            inside(path, _where(items, i))
        if not path.is_file():
            path = None
    problem = None
    if not has and path is None:
        problem = "no image (neither bytes nor an existing file)" if root else "no image bytes (a dataset in a store)"
    problem = problem or (None if tags else "no label")
    if problem:
        if not options.skip_bad:
            raise DatasetError(f"{_where(items, i)}: {problem} (set dataset.on_corrupt='skip' to leave such rows out)")
        rows.skipped.add(NO_LABEL if has or path is not None else NO_IMAGE, f"{_where(items, i)}: {problem}, left out")
        return
    if path is not None:
        items.add(i, str(path), local=True)
    else:
        items.add(i, stored or "")
    rows.names.append("|".join(tags))
    rows.codes.append(SPLITS.get(items.splits[-1], 0))


def _where(items: TableRowsBuilder, i: int) -> str:
    return f"{items.splits[-1]} row {i} ({base(items.files[-1])})"


def _splits_of_saved(root: Path) -> Splits:
    """(split, its Arrow files) of a `save_to_disk` folder or of the Hub's download (`root`: a `load_dataset` id)."""
    datasets = library()
    loaded = datasets.load_from_disk(str(root))
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(str(loaded.split or "train"), loaded)]
    return [(str(name), [Path(c["filename"]) for c in ds.cache_files]) for name, ds in parts]


def read_huggingface(
    location: str, files: list[Path | str], options: ReadOptions | None = None, inside: Inside | None = None
) -> Dataset:
    """The dataset at `location` (`files`: its folder or Parquet file, checked, or its folder's or Parquet file's URL
    in an object store; none for a Hub id). With `inside`, every Arrow or Parquet file, and every image file a row
    names, is checked by it before it is read."""
    options = options or ReadOptions()
    built = True  # the Arrow files are the library's, in its cache: not the user's, so not under the rule
    objects: dict[str, ObjectInfo] = {}
    if is_hub(location):
        root, splits = None, load_hub(location, options.huggingface)
    else:
        (root,) = files
        if isinstance(root, str):  # an object-store URL (services/data/formats/urls.py): its Parquet objects
            try:
                objects = parquet_objects(root)
            except NoParquet as e:
                raise DatasetError(str(e)) from None
            library()
            splits, built = _by_split(list(objects), root), False
        elif saved(root):
            splits, built = _splits_of_saved(root), False
        elif metadata_files(root):
            splits = load_folder(root, inside)
        elif found := parquet_files(root):
            library()
            splits, built = _by_split(found, root), False
        else:
            raise DatasetError(
                f"{root} is not a Hugging Face dataset: no `dataset_dict.json` or `state.json` (a save_to_disk "
                "folder), no `metadata.csv` or `metadata.jsonl` (an imagefolder) and no .parquet file"
            )
    rows = _Rows(TableRowsBuilder(options.huggingface.image_column), objects=objects)
    return _dataset(location, root, splits, options, inside if root is not None else None, built, rows)


def _by_split(found: list[Path] | list[str], root: Path | str) -> Splits:
    """Parquet files (or objects) by the split their names say."""
    splits: dict[str, list[Path | str]] = {}
    for f in found:
        splits.setdefault(_split_of(f, root), []).append(f)
    return list(splits.items())


def _base(root: Path | str | None) -> Path | str | None:
    """The folder a dataset's relative names are under: its folder, or its Parquet file's (a folder URL in a
    store)."""
    if isinstance(root, str):
        return root.rstrip("/") if not root.lower().endswith(".parquet") else remote.parent(root)
    return root if root is None or root.is_dir() else root.parent


def _dataset(
    location: str,
    root: Path | str | None,
    splits: Splits,
    options: ReadOptions,
    inside: Inside | None,
    built: bool,
    rows: _Rows,
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
    top = _base(root)
    for split, split_files in splits:
        if honour and len(splits) > 1 and split not in SPLITS:
            rows.skipped.add(SPLIT, f"split {split!r}: not train, validation or test, left out")
            continue
        for file in split_files:
            if inside is not None and not built:
                inside(file, f"{split} file {base(file)}")
            local = None if isinstance(file, str) else top or file.parent
            _read_file(rows, file, split if honour else "train", options, local, inside)
    if top is None:
        top = Path(os.path.commonpath([f.parent for _, fs in splits for f in fs]))
    codes = np.frombuffer(rows.codes, dtype=np.uint8) if len(rows.codes) else np.zeros(0, np.uint8)
    parts = codes if honour and codes.any() else None
    items = rows.items.build()
    return finish(
        top,
        items,
        rows.names,
        items.where(),
        options.duplicates,
        rows.skipped.build(),
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
        if is_remote(location):  # the store is not listed to tell: a Parquet file's name, or a folder's `/`
            return location.lower().endswith((".parquet", "/"))
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
