"""`dataset` of a job spec: where the images (or videos) are, how they are split, what bad files do."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.spec.fields import NO_NUL, SEED_MAX


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None,
        min_length=1,
        pattern=NO_NUL,
        description="Dataset location on the server, inside an allowed root: an ImageFolder directory (one "
        "subfolder per class) or a CSV manifest with columns `path,label` (paths relative to the CSV), of images or "
        "of videos (.mp4, .avi, .mkv, .webm, .mov; a manifest may add `start,end` in seconds), not both. Give this "
        "or `id`, not both.",
    )
    id: str | None = Field(
        None,
        pattern=r"^ds_[0-9a-f]+$",
        description="An uploaded dataset (`POST /datasets`) of the same API key, instead of `path`; the stored "
        "spec then shows both (the API fills `path` in with the dataset's location).",
    )
    format: Literal["auto", "imagefolder", "csv"] = Field(
        "auto", description="`auto` picks `csv` for a .csv file and `imagefolder` for a directory."
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
        description="A separate test set on the server (an ImageFolder directory, or a CSV manifest named `*.csv`) "
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
        return self
