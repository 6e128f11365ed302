"""The records kept in Redis as JSON, typed (`JobRecord`, `ModelRecord`, `DatasetRecord`, `Event`, `RunningStep`),
and what every record shares: ids that sort by creation time, timestamps, and `NotFound`.

The types are TypedDicts, so a record is the dict `json.loads` returns: they name the fields each owner writes
today (jobs.py, models.py, datasets.py, events.py, workers.py and the steps in services/jobs/), not a new format.
Fields only some records have (set as a job runs, or absent from records written by older versions) are NotRequired:
read them with `.get`. The job's spec and resolved job are typed in storage/specs.py. typing_extensions' TypedDict
and no `from __future__ import annotations`, so that pydantic validates them and NotRequired is seen at run time.
"""

import os
import time
from typing import Any, Literal, NotRequired, Required

from typing_extensions import TypedDict

from storage.specs import ResolvedRecord, SpecRecord, VideoRecord

JobStatus = Literal["planning", "queued", "extracting", "training", "succeeded", "failed", "cancelled"]


class JobError(TypedDict):
    """Why a job failed: a machine-readable code and a message."""

    code: str
    message: str


class Progress(TypedDict, total=False):
    """A job's progress (services/jobs/progress.py: `JobReporter.progress`): the stage, its steps done of all, and the
    stage's own figures: images and their rate while extracting (services/extraction.py), the finished epoch's row
    while training (services/training/fit.py; `val_accuracy`, or `val_map` for a multi-label job)."""

    stage: Required[Literal["extracting", "training"]]
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
    train_seconds: float


class JobRecord(TypedDict):
    """A job (`job:<id>`): the fields `Jobs.create_job` writes, then those its steps set as it runs."""

    id: str
    object: Literal["job"]
    status: JobStatus
    created_at: float
    updated_at: float
    owner: str | None
    spec: SpecRecord  # the JobSpec, dumped (services/spec)
    progress: Progress | None
    metrics: dict[str, Any]  # extraction and training summaries, merged as the steps finish
    error: JobError | None
    model_id: str | None
    cancel_requested: bool
    resolved: ResolvedRecord | None  # ResolvedJob.record() (services/jobs/resolved.py)
    # the dataset's format as the plan step read it (`auto` resolved; services/jobs/planning.py)
    dataset_format: NotRequired[Literal["imagefolder", "csv", "jsonl", "webdataset", "huggingface"]]
    # set by the steps (services/jobs/extract.py, train.py), the watchdog (services/jobs/watchdog.py), a model's
    # deletion
    started_at: NotRequired[float]
    finished_at: NotRequired[float]
    extracted: NotRequired[bool]
    handed_off: NotRequired[Literal["extract", "train"]]  # the last next step enqueued (worker/tasks.py, the watchdog)
    cache_key: NotRequired[str]
    extract_key: NotRequired[str]
    extract_shards: NotRequired[int]
    extract_started_at: NotRequired[float]
    requeued_at: NotRequired[float | None]
    requeued_step: NotRequired[str]
    workers_lost: NotRequired[int]
    model_deleted_at: NotRequired[float]


class ModelRecord(TypedDict):
    """A registered model (`model:<id>`), as the train step registers it (services/jobs/train.py)."""

    id: str
    object: Literal["model"]
    created_at: float
    job_id: str
    owner: str | None
    name: str | None
    method: str
    mode: str
    backbone: str
    video: VideoRecord | None  # the VideoSpec, dumped; None for an image model
    classes: list[str]
    multi_label: bool
    threshold: float | None
    metrics: dict[str, Any]  # the model's metrics.json
    evaluation: dict[str, Any]  # {"split", "images", and the evaluation report's metrics}
    plots: list[str]
    size_bytes: int


class DatasetRecord(TypedDict):
    """An uploaded dataset (`dataset:<id>`), as the upload route records it (api/routes/datasets.py)."""

    id: str
    object: Literal["dataset"]
    owner: str | None
    name: str | None
    format: str
    path: str
    num_images: int
    classes: list[str]
    size_bytes: int
    created_at: NotRequired[float]  # set by DatasetRecords.add when the caller did not


class Event(TypedDict):
    """An event of a job's log, as read back: `seq` is its position in the list, not stored with it."""

    seq: int
    created_at: float
    level: str
    type: str
    message: str
    data: dict[str, Any] | None


class RunningStep(TypedDict):
    """The step a worker runs for a job (worker/tasks.py): `index` of `count` for an extraction shard."""

    task: Literal["plan", "extract", "extract_shard", "train"]
    index: NotRequired[int]
    count: NotRequired[int]


class NotFound(KeyError):
    """No record with that id."""


def new_id(prefix: str) -> str:
    """Ids that sort roughly by creation time (`job_<ms hex><random hex>`)."""
    return f"{prefix}_{int(time.time() * 1000):012x}{os.urandom(5).hex()}"


def model_id_for(job_id: str) -> str:
    """One model per job, with an id derived from the job's, so a repeated train step writes the same model."""
    return "model_" + job_id.removeprefix("job_")


def job_id_for(model_id: str) -> str:
    """The job that trains (or trained) the model of this id."""
    return "job_" + model_id.removeprefix("model_")


def now() -> float:
    return round(time.time(), 3)
