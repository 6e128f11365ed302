"""`dataset` of a job spec: where the images (or videos) are and in which format (an ImageFolder, a CSV or JSONL
manifest, WebDataset shards, a Hugging Face dataset: services/data/formats/; on the server or, for shards and
manifests, in an object store), how they are split, what bad files do."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.data.formats.base import MEDIA_KEYS
from services.data.formats.braces import MAX_SHARDS, PatternError, expand, is_shards
from services.data.formats.huggingface import HUB
from services.data.formats.urls import is_url, url_problem
from services.spec.fields import NO_NUL, SEED_MAX


class WebDatasetSpec(BaseModel):
    """Which files of a WebDataset sample hold its image (or video) and its label. A sample is the consecutive files
    of a shard sharing a key (the name up to the first dot), each file's extension saying what it holds
    (WebDataset's convention: https://github.com/webdataset/webdataset#the-webdataset-format)."""

    model_config = ConfigDict(extra="forbid")

    media_keys: list[str] = Field(
        list(MEDIA_KEYS),
        min_length=1,
        description="Extensions that hold a sample's image or video, in order of preference (WebDataset's "
        "`jpg;png` keys): the first a sample has is read.",
    )
    label_key: str = Field(
        "cls",
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="The extension of the file holding the label: `cls` (WebDataset's class file: a class index, "
        "or a class name, as text), or `json` (the label is its field `label_field`), or any other text file. "
        "Multi-label: a JSON list of tags, or `|`-separated tags.",
    )
    label_field: str = Field(
        "label", min_length=1, description="With `label_key: json`, the field of the JSON object holding the label."
    )
    classes: list[str] | None = Field(
        None,
        min_length=2,
        description="The class names in the order of their indices: a label that is an integer (or decimal text) "
        "names `classes[label]`, and a label that is a name must be one of them. Without it, labels are class "
        "names as written (`3` is the class named '3'). Either way the model's classes are sorted by name, as for "
        "every format.",
    )


class HuggingFaceSpec(BaseModel):
    """Which columns of a Hugging Face dataset hold its images and labels, and whether its own splits are the job's
    (services/data/formats/huggingface.py)."""

    model_config = ConfigDict(extra="forbid")

    image_column: str = Field(
        "image",
        min_length=1,
        description="The column holding the images or videos: an `Image` or `Video` feature (its bytes are read in "
        "place; a row holding only a file's path reads that file, which must lie under an allowed root) or a binary "
        "column. Left at `image`, a dataset without an `image` column but with a `video` one is read from that. "
        "Videos are told from images by the names the rows record (`.mp4`, ...), or by a `Video` feature.",
    )
    label_column: str = Field(
        "label",
        min_length=1,
        description="The column holding the labels: a `ClassLabel` (its names are the classes, in their order), a "
        "string or integer column (class names as written), or for `multi_label` a list of those "
        "(`Sequence(ClassLabel)`). A row without a label (null, or a ClassLabel's -1) fails the job naming it, or is "
        "skipped with `on_corrupt: skip`.",
    )
    splits: Literal["dataset", "draw"] = Field(
        "dataset",
        description="`dataset`: the dataset's own `train`, `validation` and `test` splits are the job's (a missing "
        "validation or test split is drawn from `train` by `val_fraction` and `test_fraction`; other splits are "
        "left out). `draw`: every split is pooled and the job's split drawn from them, as for any format.",
    )
    revision: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/+-]*$",
        description="A Hub id only (`hf://org/name`): the dataset's branch, tag or commit on the Hub (`datasets."
        "load_dataset`'s `revision`; default: its main branch). A commit hash pins the data, so that a job rerun "
        "reads the same rows.",
    )
    config: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$",
        description="A Hub id only: the dataset's configuration (subset) name (`datasets.load_dataset`'s `name`; "
        "default: its only or default one).",
    )


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None,
        min_length=1,
        pattern=NO_NUL,
        description="Dataset location on the server, inside an allowed root: an ImageFolder directory (one "
        "subfolder per class), a CSV manifest with columns `path,label` (paths relative to the CSV), a JSONL manifest "
        "(`.jsonl`, one object per line with `path` and `label` or `labels`, as Vertex and Azure AutoML write them), "
        "WebDataset tar shards, one or a brace pattern of them (`/data/shards/{000000..000009}.tar`, every shard under "
        f"an allowed root; at most {MAX_SHARDS:,}), or a Hugging Face dataset (a `save_to_disk` folder, a Parquet file "
        "or a folder of Parquet shards, or a Hub id `hf://org/name` where the server reaches the Hub), of images or of "
        "videos (.mp4, .avi, .mkv, .webm, .mov; a manifest may add `start,end` in seconds), not both. Shards, "
        "manifests and Parquet files may be in an object store: `s3://bucket/shards/{000000..000009}.tar`, "
        "`s3://bucket/train.csv`, `s3://bucket/ds/` (a folder of Parquet shards: end it with `/`) or "
        "`s3://bucket/ds/train.parquet` (any fsspec URL; under the allowed prefixes, SIDETUNE_ALLOWED_PREFIXES), read "
        "where they are; a manifest's rows "
        "may be such URLs too, or `file://` paths under the allowed roots. A URL never carries credentials (the "
        "service has its own). Give this or `id`, not both.",
    )
    id: str | None = Field(
        None,
        pattern=r"^ds_[0-9a-f]+$",
        description="An uploaded dataset (`POST /datasets`) of the same API key, instead of `path`; the stored "
        "spec then shows both (the API fills `path` in with the dataset's location).",
    )
    format: Literal["auto", "imagefolder", "csv", "jsonl", "webdataset", "huggingface"] = Field(
        "auto",
        description="`auto` picks `webdataset` for a path ending in `.tar` (a shard, or a pattern of shards), `csv` "
        "for a .csv file, `jsonl` for a .jsonl file, `huggingface` for `hf://` ids, .parquet files and folders "
        "holding a `save_to_disk` dataset or Parquet files (at their top or in `data/`; in an object store, a folder "
        "URL ending in `/`), and `imagefolder` for any other directory.",
    )
    webdataset: WebDatasetSpec | None = Field(
        None,
        description="WebDataset shards only: which files of a sample hold its image and its label (defaults: the "
        "first image or video extension, and the `.cls` file). Applies to `test` too when it is shards.",
    )
    huggingface: HuggingFaceSpec | None = Field(
        None,
        description="Hugging Face datasets only: the image and label columns (defaults: `image`, `label`) and "
        "whether the dataset's own splits are the job's. Applies to `test` too when it is one (all its rows).",
    )
    val_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="Fraction of each class held out for validation (seeded, stratified), on which the epoch, the "
        "sweep configuration and the L2 strength are chosen. Every class needs at least 2 images for one to be "
        "held out; a job whose validation split would be empty is refused.",
    )
    test_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of each class held out as a test split (seeded, stratified, disjoint from "
        "validation), never seen by training or selection: the selected model is evaluated once on it "
        "(`GET /models/{id}/evaluation`). 0: no test split. `val_fraction + test_fraction` must be below 1.",
    )
    test: str | None = Field(
        None,
        min_length=1,
        pattern=NO_NUL,
        description="A separate test set on the server (an ImageFolder directory, a CSV manifest named `*.csv`, a "
        "JSONL manifest named `*.jsonl`, WebDataset shards ending in `.tar`, or a Hugging Face dataset; shards, "
        "manifests and Parquet files also by URL) "
        "whose labels are among the training set's classes; instead of `test_fraction`. Its images run through the "
        "backbone and the selected model once, after training. An uploaded test set is named by `test_id`.",
    )
    test_id: str | None = Field(
        None,
        pattern=r"^ds_[0-9a-f]+$",
        description="An uploaded dataset (`POST /datasets`) of the same API key as the separate test set, instead of "
        "`test`; the stored spec then shows both, as for `id`.",
    )
    multi_label: bool = Field(
        False,
        description="Multi-label classification: the CSV manifest's label column holds `|`-separated tags (e.g. "
        "`cat|outdoor`), the model has one sigmoid output per tag (binary cross-entropy), validation selects on "
        "mean average precision, and predict returns the tags over a threshold chosen on validation. A row "
        "without any tag fails the job naming it, or is skipped and counted with `on_corrupt: skip`. The splits "
        "are then seeded but not stratified.",
    )
    split_seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of the validation and test splits.")
    on_corrupt: Literal["fail", "skip"] = Field(
        "fail",
        description="An image or video that cannot be decoded, or a manifest row whose file is missing, fails the job "
        "(`fail`, naming the file), or is skipped and counted (`skip`).",
    )
    duplicates: Literal["drop", "fail"] = Field(
        "drop",
        description="A file listed twice (a repeated manifest row, or a link to a file already in the dataset): left "
        "out with a warning event (`drop`) or the job is refused naming the rows (`fail`). A file listed with two "
        "labels is always refused. Either way no file is in both the training and the validation split.",
    )

    @model_validator(mode="after")
    def _path_or_id(self) -> DatasetSpec:
        # Both together only in a stored spec, where the API put the uploaded dataset's path next to its id; a
        # submission with both is refused by the API (api/routes/datasets.py: resolve_dataset).
        if self.path is None and self.id is None:
            raise ValueError("give `dataset.path` (a folder or CSV on the server) or `dataset.id` (an upload)")
        if self.val_fraction + self.test_fraction >= 1:
            total = self.val_fraction + self.test_fraction
            raise ValueError(
                f"dataset.val_fraction + dataset.test_fraction is {total:g}; it must be below 1 so "
                "that images are left to train on"
            )
        if (self.test is not None or self.test_id is not None) and self.test_fraction > 0:
            raise ValueError(
                "give `dataset.test` or `dataset.test_id` (a separate test set) or `dataset.test_fraction`, not both"
            )
        for field, location in (("path", self.path), ("test", self.test)):
            problem = url_problem(location) if location is not None and is_url(location) else None
            if problem is not None:  # refused before the spec is stored or shown anywhere, and not repeated
                raise ValueError(f"dataset.{field}: {problem}")
        self._check_shards()
        self._check_huggingface()
        return self

    def _check_huggingface(self) -> None:
        hub = [f for f, p in (("path", self.path), ("test", self.test)) if p is not None and p.startswith(HUB)]
        if hub and self.format not in ("auto", "huggingface"):
            raise ValueError(f"dataset.{hub[0]}: an `hf://` id is a Hugging Face dataset; set format to huggingface")
        if self.huggingface is not None and self.format not in ("auto", "huggingface"):
            raise ValueError(
                f"dataset.huggingface applies to Hugging Face datasets, not to format {self.format!r}; remove it"
            )
        hf = self.huggingface
        asked = [f for f in ("revision", "config") if hf is not None and getattr(hf, f) is not None]
        if asked and not hub:
            raise ValueError(
                f"dataset.huggingface.{asked[0]} applies to a Hub id (`hf://org/name`) only; a dataset on the server "
                "is read as it is"
            )

    def _shards(self, test: bool) -> bool:
        """Whether `path` (`test`: `test`) names WebDataset shards."""
        path = self.test if test else self.path
        fmt = "auto" if test else self.format
        return path is not None and (fmt == "webdataset" or (fmt == "auto" and is_shards(path)))

    def _check_shards(self) -> None:
        for test, field in ((False, "path"), (True, "test")):
            if self._shards(test):
                try:
                    self.locations(test)
                except PatternError as e:
                    raise ValueError(f"dataset.{field}: {e}") from None
        if self.webdataset is not None and not (self._shards(False) or self._shards(True)):
            raise ValueError(
                "dataset.webdataset applies to WebDataset shards (`format: webdataset`, or a path ending in .tar); "
                "remove it, or name the shards"
            )

    def locations(self, test: bool = False) -> list[str]:
        """The server paths `path` (`test`: `test`) names: itself, each shard of a WebDataset pattern, or none for
        a Hugging Face Hub id (what the API checks at submission, services/paths.py). PatternError for a malformed
        pattern."""
        path = self.test if test else self.path
        if path is None or path.startswith(HUB):  # a Hub id names nothing on the server
            return []
        return expand(path) if self._shards(test) else [path]
