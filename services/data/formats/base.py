"""What every dataset format answers (`DatasetFormat`), and the options a job's spec gives the reading (`ReadOptions`).

A format turns a location (what `dataset.path` holds) into a `Dataset` (formats/samples.py) in three steps, so that
services/paths.py's rule runs between them, the same for every format:

1. `claims(location)`: whether `dataset.format: auto` picks it for this location;
2. `locations(location)`: the server paths the location names, each checked by the rule before anything is read
   (one path; a WebDataset brace pattern names each shard; an object-store URL is checked against the allowed
   prefixes instead of the roots);
3. `read(location, files, options, inside)`: the samples, from those paths checked and resolved; `inside` checks
   any further file the format reaches (a class folder, a linked file, a manifest's row) before it is looked at.

Items are files or members of files (formats/samples.py: `Item`): whatever a format reads, the loaders read each
sample by its `read_bytes()`, so a new kind of item (a row of a Parquet file, an object in a bucket) is a new class
answering the same. Torch-free.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from services.data.formats.samples import Dataset
from storage.archives import Limits

# Checks a file or folder of the dataset, links followed, or an object URL (UserPaths.check_member bound to a field):
# (path or URL, what).
Inside = Callable[[Path | str, str], None]

# a WebDataset sample's image or video: the first of these extensions it has (WebDataset's `jpg;png;...` keys):
# every suffix the other formats read, the common ones first
MEDIA_KEYS = (
    "jpg",
    "jpeg",
    "png",
    "webp",
    "bmp",
    "gif",
    "tif",
    "tiff",
    "ppm",
    "pgm",
    "mp4",
    "webm",
    "mkv",
    "mov",
    "avi",
)


@dataclass(frozen=True)
class WebDatasetOptions:
    """Which files of a WebDataset sample hold what (services/spec/dataset.py: `WebDatasetSpec` documents them)."""

    media_keys: tuple[str, ...] = MEDIA_KEYS
    label_key: str = "cls"
    label_field: str = "label"
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class HuggingFaceOptions:
    """Which columns of a Hugging Face dataset hold what, and whether its own splits are the job's
    (services/spec/dataset.py: `HuggingFaceSpec` documents them)."""

    image_column: str = "image"
    label_column: str = "label"
    splits: str = "dataset"
    revision: str | None = None
    config: str | None = None


@dataclass(frozen=True)
class ReadOptions:
    """How a job reads its dataset: `multi_label` (labels hold `|`-separated tags), `skip_bad` (on_corrupt=skip:
    a row whose file is missing, a sample without a label, a truncated shard is left out and noted), `duplicates`
    (`drop` or `fail` a file listed twice), the options of the formats that have some, and `limits`: what an archive
    the dataset is made of may hold (a WebDataset shard; the server's upload limits for a job, none otherwise)."""

    multi_label: bool = False
    skip_bad: bool = False
    duplicates: str = "drop"
    webdataset: WebDatasetOptions = field(default_factory=WebDatasetOptions)
    huggingface: HuggingFaceOptions = field(default_factory=HuggingFaceOptions)
    limits: Limits | None = None


class DatasetFormat(ABC):
    """One on-disk layout of a labelled dataset. `name` is its `dataset.format`."""

    name: ClassVar[str]

    @abstractmethod
    def claims(self, location: str) -> bool:
        """Whether `dataset.format: auto` reads `location` as this format (formats are asked in the registry's
        order, the last one claims everything)."""

    def locations(self, location: str) -> list[str]:
        """The server paths (or object-store URLs) `location` names, each checked by services/paths.py's rule
        before `read`."""
        return [location]

    @abstractmethod
    def read(self, location: str, files: list[Path | str], options: ReadOptions, inside: Inside | None) -> Dataset:
        """The dataset at `location`, whose `locations` are `files` (checked: paths resolved where they exist,
        object-store URLs as str). A DatasetError names the file, line or sample at fault."""
