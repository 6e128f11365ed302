"""The job spec and the resolved job as storage holds them: the JSON of `services.spec.JobSpec` and of
`services.jobs.resolved.ResolvedJob` (`model_dump(mode="json")`), typed part by part. A job record holds both
(storage/redis/records.py), a cache key a video backbone's `VideoRecord` (storage/cache/meta.py).

Storage sits below services and never imports them, so these TypedDicts describe the dumped form rather than the
models; `tests/storage/test_specs.py` checks that every field of the models is named here with a type its
dump validates against, so a field added to a spec part fails that test until it is added here. A method's fields
are those of every method together (`MethodRecord`), `name` telling which apply.

typing_extensions' TypedDict, so pydantic validates them (a response model, the test above); no
`from __future__ import annotations`, so that `Required` and `NotRequired` are seen at run time.
"""

from typing import Literal, Required

from typing_extensions import TypedDict

TokenMode = Literal["auto", "all", "cls", "mean"]
Pool = Literal["auto", "cls", "mean"]


class WebDatasetSpecRecord(TypedDict):
    """`spec.dataset.webdataset` (services/spec/dataset.py: WebDatasetSpec)."""

    media_keys: list[str]
    label_key: str
    label_field: str
    classes: list[str] | None


class HuggingFaceSpecRecord(TypedDict):
    """`spec.dataset.huggingface` (services/spec/dataset.py: HuggingFaceSpec)."""

    image_column: str
    label_column: str
    splits: Literal["dataset", "draw"]
    revision: str | None
    config: str | None


class DatasetSpecRecord(TypedDict):
    """`spec.dataset` (services/spec/dataset.py)."""

    path: str | None
    id: str | None
    format: Literal["auto", "imagefolder", "csv", "jsonl", "webdataset", "huggingface"]
    webdataset: WebDatasetSpecRecord | None
    huggingface: HuggingFaceSpecRecord | None
    val_fraction: float
    test_fraction: float
    test: str | None
    test_id: str | None
    multi_label: bool
    split_seed: int
    on_corrupt: Literal["fail", "skip"]
    duplicates: Literal["drop", "fail"]


class VideoRecord(TypedDict):
    """`spec.backbone.video` (services/video/spec.py), and a video model's record's `video`."""

    num_frames: int
    tubelet: int
    init: Literal["central_frame", "filter_inflation"]
    sampling: Literal["uniform", "strided"]
    frame_stride: int


class BackboneSpecRecord(TypedDict):
    """`spec.backbone` (services/spec/backbone.py)."""

    name: str
    pretrained: bool
    checkpoint: str | None
    image_size: int | None
    init_seed: int
    precision: Literal["auto", "fp32", "bf16"]
    video: VideoRecord | None


class MethodRecord(TypedDict, total=False):
    """`spec.method` (services/methods/<name>/config.py): `name`, and that method's own fields among these."""

    name: Required[str]
    rank: int  # apla, arc, lora, losa
    subset_seed: int  # apla
    dropout: float  # arc, lora
    alpha: float  # lora
    targets: list[Literal["qkv", "proj", "fc1", "fc2"]]  # lora
    layers: Literal["all"] | int | list[int]  # losa
    pool: Pool  # linear, losa
    solver: Literal["auto", "lbfgs", "sgd"]  # linear
    cv_folds: int  # linear
    cv_max_images: int  # linear
    max_iter: int  # linear


class EveryKthRecord(TypedDict):
    every: int


class LastKRecord(TypedDict):
    last: int


class ExtractionSpecRecord(TypedDict):
    """`spec.extraction` (services/spec/extraction.py)."""

    batch_size: int | Literal["auto"]
    layers: Literal["auto", "all"] | list[int] | EveryKthRecord | LastKRecord
    tokens: TokenMode
    codec: Literal["none", "zstd", "blosc"]
    shards: int | Literal["auto"]
    decode: Literal["cpu", "device"]
    keepbits: int | None


class ExecutionSpecRecord(TypedDict):
    """`spec.execution` (services/spec/training.py)."""

    mode: Literal["auto", "cache", "images", "tail", "online"]
    tail_blocks: int
    augment: bool


class TrainingSpecRecord(TypedDict):
    """`spec.training` (services/spec/training.py)."""

    epochs: int | Literal["auto"]
    batch_size: int
    optimizer: Literal["auto", "sgd", "adamw"]
    lr: float | Literal["auto"]
    weight_decay: float | Literal["auto"]
    warmup_epochs: float | Literal["auto"]
    clip_grad_norm: float | Literal["auto"] | None
    label_smoothing: float
    class_weights: Literal["none", "balanced"]
    early_termination: bool | Literal["auto"]
    seed: int
    compile: bool


class SweepSpecRecord(TypedDict):
    """`spec.sweep` (services/spec/sweep.py): each axis's values, or None."""

    lr: list[float] | None
    weight_decay: list[float] | None
    rank: list[int] | None
    layers: list[Literal["all"] | int | list[int]] | None
    pool: list[Pool] | None


class SpecRecord(TypedDict):
    """A job record's `spec`: the JobSpec as submitted, defaults filled in, upload ids resolved to the API's paths."""

    name: str | None
    dataset: DatasetSpecRecord
    backbone: BackboneSpecRecord
    method: MethodRecord
    extraction: ExtractionSpecRecord
    execution: ExecutionSpecRecord
    training: TrainingSpecRecord
    sweep: SweepSpecRecord | None


class SplitRecord(TypedDict):
    """`resolved.split` (services/jobs/resolved.py: `ResolvedSplit`): counts, hashes and the codes or their file."""

    seed: int
    val_fraction: float
    test_fraction: float
    images: int
    train: int
    val: int
    test: int
    labels_sha: str
    parts_sha: str
    codes: str | None
    file: str | None


class BudgetsRecord(TypedDict):
    """`resolved.budgets` (services/jobs/resolved.py: `MemoryBudgets`)."""

    host_bytes: int
    gpu_bytes: int | None


class ResolvedRecord(TypedDict):
    """A job record's `resolved` (services/jobs/resolved.py: `ResolvedJob.record()`): what was decided at submission.
    Its `spec` is the record's own again (kept: records already written carry it, and readers validate it)."""

    spec: SpecRecord
    mode: str
    needs_cache: bool
    images: int
    classes: int
    test_images: int
    configurations: int
    cached_layers: list[int] | None
    cached_token_mode: str | None
    split: SplitRecord
    budgets: BudgetsRecord
    dataset_fingerprint: str | None
    weights_hash: str | None
