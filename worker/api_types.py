"""The API's JSON as the client (worker/client.py) sends and reads it: TypedDicts, so an answer is still the dict
`httpx` decodes, with its keys named.

The client imports nothing of the server at run time, so these are its own view of the answers that api/schemas.py
documents (and of the job spec, services/spec/): the keys the CLI, the demo and the progress bars use, and the
headline ones beside them. A TypedDict lists keys, it does not close the dict: an answer may hold more (a method's
own settings, a job's further metrics), and `.get` reads those. Keys an answer always holds are required (the API's
response models fill in null); keys that only some answers hold are NotRequired.

No `from __future__ import annotations` here: with it, Python 3.11 reads every key as required (`Required` and
`NotRequired` are lost in the strings), and the tests read the keys (tests/worker/test_api_types.py).
"""

from typing import Literal, NotRequired, Required, TypedDict

from worker.api_spec import JobSpecBody, VideoBody
from worker.api_spec import (  # the job spec's bodies, named here too for the client's one import
    WebDatasetBody as WebDatasetBody,
)

# ---- jobs ----------------------------------------------------------------------------------------------------------


class JobError(TypedDict):
    code: str
    message: str


class Progress(TypedDict, total=False):
    """A job's `progress`: its stage, done and total steps, and the stage's figures (extracting: images and their
    rate; training: the last epoch's row)."""

    stage: Required[str]
    done: Required[int]
    total: Required[int]
    images: int
    images_per_s: float
    epoch: int
    train_loss: float
    val_accuracy: float
    val_map: float
    val_loss: float
    lr: float


class EpochRow(TypedDict, total=False):
    """A row of a curve (`history`): one epoch of a configuration; `val_map` instead of `val_accuracy` when
    multi-label."""

    epoch: int
    train_loss: float
    val_accuracy: float
    val_map: float
    val_loss: float
    lr: float
    train_seconds: float


class SweepConfig(TypedDict, total=False):
    """A configuration of a sweep: the values it gives the swept settings (services/spec/sweep.py)."""

    lr: float
    weight_decay: float
    rank: int
    layers: Literal["all"] | int | list[int]
    pool: Literal["auto", "cls", "mean"]


class SweepEntry(TypedDict, total=False):
    """A configuration's (or, for the L-BFGS probe, a fit's) result in `metrics.sweep`."""

    config: Required[SweepConfig]
    val_accuracy: float
    val_map: float
    val_loss: Required[float]
    weight_decay: float
    best_epoch: int
    history: list[EpochRow]
    stopped_after_epoch: int


class Metrics(TypedDict, total=False):
    """A job's (and its model's) `metrics`: the extraction's and the training's summaries. Single-label models have
    `*_accuracy`, multi-label ones `*_map`; `test_*` only with a test split; a sweep adds `configurations`, `selected`
    and `sweep`; the L-BFGS probe `weight_decay` and its path, the loop `history`."""

    cache_hit: bool
    backbone_forwards: int
    extract_seconds: float
    val_accuracy: float
    val_map: float
    val_loss: float
    test_accuracy: float
    test_map: float
    train_images: int
    val_images: int
    test_images: int
    trainable_params: int
    train_seconds: float
    train_images_per_s: float
    best_epoch: int
    epochs: int
    history: list[EpochRow]
    weight_decay: float
    configurations: int
    selected: SweepConfig
    sweep: list[SweepEntry]


JobStatus = Literal["planning", "queued", "extracting", "training", "succeeded", "failed", "cancelled"]


class Job(TypedDict):
    """`GET /jobs/{id}` (and what submit and cancel answer)."""

    id: str
    object: Literal["job"]
    status: JobStatus
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    spec: JobSpecBody
    dataset_format: Literal["imagefolder", "csv", "jsonl", "webdataset", "huggingface"] | None
    progress: Progress | None
    metrics: Metrics
    error: JobError | None
    model_id: str | None
    cancel_requested: bool
    cache_key: str | None
    extract_shards: int | None


class Plan(TypedDict):
    """`POST /jobs?dry_run=true`: the fields the CLI shows; the answer holds every field of services/jobs/plan.py."""

    backbone: str
    method: str
    mode: str
    images: int
    configurations: int
    classes: int
    cache_bytes: int | None
    fits: bool | None
    memory_fits: bool | None
    extraction_s: float | None
    message: str
    notes: list[str]


class Checkpoint(TypedDict):
    name: str
    size_bytes: int
    created_at: float | None
    epoch: int | None
    best_epoch: int | None


class CheckpointList(TypedDict):
    """`GET /jobs/{id}/checkpoints`."""

    object: Literal["list"]
    data: list[Checkpoint]
    expires_at: float | None


# ---- models --------------------------------------------------------------------------------------------------------


class EvaluationSummary(TypedDict, total=False):
    """A model's `evaluation`: the split its report was computed on, its images and its headline figures (those of
    the split it names: `test_*` or `val_*`)."""

    split: Required[Literal["test", "val"]]
    images: Required[int]
    test_accuracy: float
    test_balanced_accuracy: float
    test_top5_accuracy: float
    test_macro_f1: float
    test_map: float
    test_micro_f1: float
    val_accuracy: float
    val_balanced_accuracy: float
    val_top5_accuracy: float
    val_macro_f1: float
    val_map: float
    val_micro_f1: float


class Model(TypedDict):
    """`GET /models/{id}`."""

    id: str
    object: Literal["model"]
    created_at: float
    job_id: str
    name: str | None
    method: str
    mode: str
    backbone: str
    video: VideoBody | None
    classes: list[str]
    multi_label: bool
    threshold: float | None
    metrics: Metrics
    evaluation: EvaluationSummary | None
    plots: list[str]
    size_bytes: int | None


# `class` is a keyword: the functional form
PerClass = TypedDict(
    "PerClass",
    {
        "class": str,
        "precision": float,
        "recall": float,
        "f1": float,
        "support": int,
        "average_precision": NotRequired[float | None],  # multi-label models only
    },
)


class SparseConfusion(TypedDict):
    """Above 100 classes: the cells that are not zero, as triples (true[i], predicted[i]) -> count[i]."""

    format: Literal["coo"]
    shape: list[int]
    true: list[int]
    predicted: list[int]
    count: list[int]


class Confusion(TypedDict):
    true: str
    predicted: str
    count: int


class Evaluation(TypedDict):
    """A page of `GET /models/{id}/evaluation`: the rows of classes [offset, offset + limit)."""

    split: Literal["test", "val"]
    images: int
    threshold: NotRequired[float]  # multi-label
    metrics: dict[str, float]  # `<split>_<figure>`: which figures depends on the split and the kind of model
    offset: int
    limit: int
    total: int
    has_more: bool
    classes: list[str]
    per_class: list[PerClass]
    # up to 100 classes: rows of counts; multi-label: [[tn, fp], [fn, tp]] per tag
    confusion_matrix: NotRequired[list[list[int]] | list[list[list[int]]]]
    confusion: NotRequired[SparseConfusion]  # instead, above 100 classes
    top_confusions: NotRequired[list[Confusion]]  # single-label


# ---- predict -------------------------------------------------------------------------------------------------------


class Instance(TypedDict, total=False):
    """One input of a predict request: an image or a video file, base64."""

    image_b64: str
    video_b64: str


class PredictBody(TypedDict):
    """The body of `POST /v1/models/{id}:predict`, and with `models` of `POST /v1/predict`."""

    instances: list[Instance]
    threshold: NotRequired[float]
    models: NotRequired[list[str]]


class Prediction(TypedDict):
    label: str
    scores: dict[str, float]  # by class name
    labels: list[str] | None  # multi-label models: the tags at or over the threshold


class ModelPredictions(TypedDict):
    model_id: str
    predictions: list[Prediction]


# ---- datasets, the feature cache, readiness --------------------------------------------------------------------------


class Dataset(TypedDict):
    """`GET /datasets/{id}`, and what an upload answers."""

    id: str
    object: Literal["dataset"]
    name: str | None
    format: Literal["imagefolder", "csv"]
    num_images: int
    classes: list[str]
    size_bytes: int
    created_at: float


class CacheMeta(TypedDict, total=False):
    """What a complete cache entry holds (none of it while it is written)."""

    backbone: str
    layers: list[int]
    token_mode: Literal["all", "cls", "mean"]
    shape: list[int]
    codec: Literal["none", "zstd", "blosc"]


class CacheEntry(TypedDict):
    key: str
    bytes: int
    complete: bool
    last_used: float | None
    pinned_by: list[str]
    extracting: str | None
    meta: CacheMeta


class CacheList(TypedDict):
    """`GET /cache` (an admin key)."""

    object: Literal["list"]
    data: list[CacheEntry]
    bytes: int
    quota_bytes: int | None
    free_disk_bytes: int | None


class Ready(TypedDict):
    """`GET /readyz` (503 when not ready)."""

    status: Literal["ready", "not_ready"]
    redis: bool
    redis_writable: bool
    workers: dict[str, int]  # live workers by queue
    reason: str | None
