"""Reading a dataset: the formats (services/data/formats/: ImageFolder, CSV and JSONL manifests, WebDataset shards,
Hugging Face datasets; one module each behind `DatasetFormat`; shards and manifests on the server or in an object
store), the one that `dataset.format` names or `auto` picks, and a job's dataset read through services/paths.py's
rule (`read_for_job`): every path its location names, then every class folder, linked file, manifest row, shard or
Arrow/Parquet file the format reaches. The result is a `Dataset` (formats/samples.py: sorted samples, class names, a
fingerprint over the items so that a changed dataset gets a new cache entry). Torch-free.

`Dataset`, `DatasetError` and the readers of each format are imported from here by the rest of the code.
"""

from __future__ import annotations

import unicodedata
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from services.data import images
from services.data.formats.base import DatasetFormat, HuggingFaceOptions, Inside, ReadOptions, WebDatasetOptions
from services.data.formats.csv_manifest import CsvManifest, read_csv
from services.data.formats.huggingface import HuggingFace, read_huggingface
from services.data.formats.imagefolder import ImageFolder, read_imagefolder
from services.data.formats.jsonl_manifest import JsonlManifest, read_jsonl
from services.data.formats.samples import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    Dataset,
    DatasetError,
    InFile,
    Item,
    RemoteFile,
    ShardMember,
    TableRow,
    check_distinct,
    media_kind,
    name_clash,
    readable,
)
from services.data.formats.urls import is_remote, local_path
from services.data.formats.webdataset import WebDataset, read_webdataset
from services.paths import UserPaths
from storage.archives import Limits

if TYPE_CHECKING:
    from services.spec.dataset import DatasetSpec

__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "Dataset",
    "DatasetError",
    "Inside",
    "Item",
    "RemoteFile",
    "ShardMember",
    "TableRow",
    "check_distinct",
    "format_for",
    "load_image",
    "media_kind",
    "name_clash",
    "read_csv",
    "read_dataset",
    "read_for_job",
    "read_huggingface",
    "read_imagefolder",
    "read_jsonl",
    "read_test_set",
    "read_webdataset",
    "resolve_format",
]

# `auto` asks them in this order: shards by their name, a manifest by its suffix, a Hugging Face dataset by its
# `hf://` id, its save_to_disk files or its Parquet files; anything else is a folder
FORMATS: dict[str, DatasetFormat] = {
    f.name: f for f in (WebDataset(), CsvManifest(), JsonlManifest(), HuggingFace(), ImageFolder())
}


def format_for(location: str | Path, fmt: str = "auto") -> DatasetFormat:
    """The format `fmt` names (`dataset.format`), or the first that claims `location` for `auto`."""
    if fmt != "auto":
        return FORMATS[fmt]
    return next(f for f in FORMATS.values() if f.claims(local_path(str(location))))


def resolve_format(path: Path, fmt: str) -> str:
    """The name of `format_for`."""
    return format_for(path, fmt).name


def read_dataset(
    path: Path | str,
    fmt: str = "auto",
    multi_label: bool = False,
    on_corrupt: str = "fail",
    inside: Inside | None = None,
    duplicates: str = "drop",
    webdataset: WebDatasetOptions | None = None,
    huggingface: HuggingFaceOptions | None = None,
) -> Dataset:
    """The dataset at `path` (a folder, a manifest, a shard or a pattern of shards). With `inside`, every class
    folder, linked file, manifest row and shard is checked by it before it is read."""
    reader = format_for(path, fmt)
    options = ReadOptions(
        multi_label,
        on_corrupt == "skip",
        duplicates,
        webdataset or WebDatasetOptions(),
        huggingface or HuggingFaceOptions(),
    )
    files: list[Path | str] = [p if is_remote(p) else Path(local_path(p)) for p in reader.locations(str(path))]
    return reader.read(str(path), files, options, inside)


def _options(dataset: DatasetSpec, limits: Limits) -> ReadOptions:
    """What a job's `dataset` spec says about reading it, under the server's `limits` on archives."""
    wds, hf = dataset.webdataset, dataset.huggingface
    return ReadOptions(
        dataset.multi_label,
        dataset.on_corrupt == "skip",
        dataset.duplicates,
        WebDatasetOptions()
        if wds is None
        else WebDatasetOptions(
            tuple(k.lower() for k in wds.media_keys),
            wds.label_key,
            wds.label_field,
            None if wds.classes is None else tuple(wds.classes),
        ),
        HuggingFaceOptions()
        if hf is None
        else HuggingFaceOptions(hf.image_column, hf.label_column, hf.splits, hf.revision, hf.config),
        limits,
    )


def read_for_job(dataset: DatasetSpec, paths: UserPaths, test: bool = False) -> Dataset:
    """The dataset a job spec names (`test`: its `dataset.test`) under services/paths.py's rule: every path its
    location names (ForbiddenPath; FileNotFoundError for a missing folder or manifest, a DatasetError listing
    missing shards), and every file it resolves to. Errors name the field."""
    field = "dataset.test" if test else "dataset.path"
    upload = dataset.test_id if test else dataset.id
    location = dataset.test if test else dataset.path
    try:
        reader = format_for(location, "auto" if test else dataset.format)
        named = reader.locations(location)
        files = [_checked(paths, field, p, upload, several=len(named) > 1) for p in named]
        return reader.read(
            location, files, _options(dataset, paths.archive_limits), partial(paths.check_member, field, upload=upload)
        )
    except DatasetError as e:
        e.field = field
        raise


def _checked(paths: UserPaths, field: str, path: str, upload: str | None, several: bool) -> Path | str:
    """`path` resolved under the rule (an object-store URL under the prefix rule, not looked up here); one of
    `several` that is missing is left to the format to name with the others."""
    try:
        return paths.check_location(field, path, upload)
    except FileNotFoundError:
        if not several:
            raise
        return Path(local_path(path))


def read_test_set(dataset: DatasetSpec, paths: UserPaths, classes: list[str]) -> tuple[Dataset, np.ndarray]:
    """A job's `dataset.test` (under services/paths.py's rule) and its targets in the order of the training set's
    `classes`: class indices, or [n, tags] for multi-label. DatasetError naming classes (tags) the training set does
    not have."""
    test = read_for_job(dataset, paths, test=True)
    unknown = sorted(set(test.classes) - set(classes))
    if unknown:
        folded = {unicodedata.normalize("NFC", c).casefold(): c for c in classes}
        near = [
            name_clash(folded[k], u) for u in unknown[:5] if (k := unicodedata.normalize("NFC", u).casefold()) in folded
        ]
        hint = f" ({'; '.join(near)}: spell them as the training set does)" if near else ""
        listed = ", ".join(ascii(u) for u in unknown[:5])
        raise DatasetError(
            f"dataset.test has {'tags' if dataset.multi_label else 'classes'} the training set does "
            f"not have: {listed}{hint}",
            field="dataset.test",
        )
    order = [classes.index(c) for c in test.classes]
    if test.multi_label:
        targets = np.zeros((len(test), len(classes)), dtype=np.int64)
        targets[:, order] = test.labels
        return test, targets
    return test, np.asarray(order, dtype=np.int64)[test.labels]


def load_image(source: Item | bytes, draft: int | None = None, data: bytes | None = None):
    """An RGB PIL image, decoded by the rules of services/data/images.py; DatasetError naming the file (or the shard
    and its member) otherwise. `data`: the item's bytes, read already (formats/samples.py: `read_together`)."""
    try:
        if isinstance(source, InFile):
            return images.load_image(readable(source) if data is None else data, draft, name=str(source))
        return images.load_image(source, draft)
    except images.ImageError as e:
        raise DatasetError(str(e)) from None
