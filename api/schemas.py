"""Response and request bodies of the API (the job spec itself is services/spec/). Every field is described
so the OpenAPI document is the reference."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import TypedDict  # pydantic reads a TypedDict from typing only on Python 3.12 and later

# The plan of `POST /jobs?dry_run=true`: its schema (every field described) lives in services/jobs/plan.py, which the
# CLI also uses (the CLI must not import the API); re-exported here so the API's bodies are all found in this module.
from services.architectures import Architecture  # noqa: F401
from services.jobs.plan import Plan  # noqa: F401
from services.video.spec import VideoSpec


class ErrorDetail(BaseModel):
    code: str = Field(..., description="Machine-readable error code, e.g. `invalid_request`, `not_found`.")
    message: str = Field(..., description="What went wrong, naming the field, file or value at fault.")


class ErrorBody(BaseModel):
    error: ErrorDetail = Field(..., description="The error.")


class JobError(BaseModel):
    code: str = Field(..., description="Error code, e.g. `invalid_dataset`, `invalid_backbone`.")
    message: str = Field(..., description="Why the job failed.")


class Progress(BaseModel):
    """A running job's stage, as its steps report it (services/jobs/progress.py), with the stage's own figures."""

    model_config = ConfigDict(extra="allow")

    stage: str = Field(..., description="`extracting` or `training`.")
    done: int = Field(..., description="Steps done: batches extracted, or epochs trained.")
    total: int = Field(..., description="Steps in the stage.")
    # the stage's figures, after the three above: extracting `images`, `images_per_s`; training the last epoch's row
    # (`epoch`, `train_loss`, `val_accuracy` or `val_map`, `val_loss`, `lr`, `train_seconds`); null: not a number
    # (a diverged loss), as JSON has none
    __pydantic_extra__: dict[str, int | float | None] = Field(init=False)


class Job(BaseModel):
    id: str = Field(..., description="Job id (`job_...`), time-ordered.")
    object: Literal["job"] = Field("job", description="Always `job`.")
    status: Literal["planning", "queued", "extracting", "training", "succeeded", "failed", "cancelled"] = Field(
        ..., description="Lifecycle: planning -> queued -> extracting -> training -> succeeded | failed | cancelled."
    )
    created_at: float = Field(..., description="Unix time of submission.")
    updated_at: float = Field(..., description="Unix time of the last change.")
    started_at: float | None = Field(None, description="Unix time the first step started.")
    finished_at: float | None = Field(None, description="Unix time the job ended.")
    spec: dict[str, Any] = Field(..., description="The submitted job spec, with defaults filled in.")
    dataset_format: Literal["imagefolder", "csv", "jsonl", "webdataset", "huggingface"] | None = Field(
        None, description="The format the dataset was read in (`dataset.format`, `auto` resolved), once planned."
    )
    progress: Progress | None = Field(None, description="Current stage, done and total steps.")
    metrics: dict[str, Any] = Field(..., description="Extraction and training metrics gathered so far.")
    error: JobError | None = Field(None, description="Set when status is `failed`.")
    model_id: str | None = Field(None, description="The adapted model, once the job succeeded.")
    cancel_requested: bool = Field(False, description="A cancel was requested; running steps stop at a check.")
    cache_key: str | None = Field(None, description="The feature cache entry the job trains from.")
    extract_shards: int | None = Field(
        None, description="Shard tasks the extraction was split into (several extract workers write in parallel)."
    )


class JobList(BaseModel):
    object: Literal["list"] = Field("list", description="Always `list`.")
    data: list[Job] = Field(..., description="Jobs, newest first.")
    has_more: bool = Field(..., description="More jobs follow; pass the last id as `after`.")


class Event(BaseModel):
    seq: int = Field(..., description="Sequence number (1-based); pass the last one seen as `after`.")
    created_at: float = Field(..., description="Unix time.")
    level: Literal["info", "warning", "error"] = Field(..., description="Severity.")
    type: Literal["message", "metrics"] = Field(..., description="`metrics` events carry numbers in `data`.")
    message: str = Field(..., description="Human-readable text.")
    data: dict[str, Any] | None = Field(None, description="Structured payload (metrics, hyperparameters).")


class EventList(BaseModel):
    object: Literal["list"] = Field("list", description="Always `list`.")
    data: list[Event] = Field(..., description="Events after `after`, oldest first.")
    has_more: bool = Field(..., description="More events follow; pass the last `seq` as `after`.")


class Checkpoint(BaseModel):
    name: str = Field(..., description="File name; `GET /jobs/{id}/checkpoints/{name}` downloads it.")
    size_bytes: int = Field(..., description="Size of the file.")
    created_at: float | None = Field(
        None, description="Unix time it was last written (null where the store cannot tell)."
    )
    epoch: int | None = Field(
        None, description="The last finished epoch the checkpoint holds (the same for both files of a checkpoint)."
    )
    best_epoch: int | None = Field(
        None,
        description="The epoch whose weights scored best on validation (of a sweep's best configuration); each "
        "configuration's best weights are held too.",
    )


class CheckpointList(BaseModel):
    object: Literal["list"] = Field("list", description="Always `list`.")
    data: list[Checkpoint] = Field(
        ...,
        description="The job's checkpoint files: `checkpoint.safetensors` holds the last epoch's trainable "
        "weights and optimizer state (`runs<i>.*`), the best weights of their configurations (`best<i>.*`, "
        "stacked) and every configuration's curve (`history`); `checkpoint.json` summarises it: the epoch, the best "
        "epoch, and each configuration's best score. Empty once removed, before the first epoch ends, "
        "and for jobs that train no epochs (the L-BFGS linear probe).",
    )
    expires_at: float | None = Field(
        None,
        description="Unix time the checkpoint is removed: the job's end plus SIDETUNE_CHECKPOINT_RETENTION_H; "
        "null while the job runs.",
    )


class EvaluationSummary(BaseModel):
    """A model's evaluation in brief: the split, its images, then the report's headline figures."""

    model_config = ConfigDict(extra="allow")

    split: Literal["test", "val"] = Field(..., description="The split the report was computed on.")
    images: int = Field(..., description="Images evaluated.")
    # the figures, after the two above: `<split>_accuracy`, `_balanced_accuracy`, `_macro_f1`, `_top5_accuracy` (more
    # than 5 classes); multi-label `<split>_map`, `_micro_f1`, `_macro_f1`; null: not a number
    __pydantic_extra__: dict[str, int | float | None] = Field(init=False)


class Model(BaseModel):
    """A registered model: what clients need of its manifest (services/models/manifest.py: method, mode, backbone,
    video, classes, threshold; the train step registers them from it), its metrics and files."""

    id: str = Field(..., description="Model id (`model_...`).")
    object: Literal["model"] = Field("model", description="Always `model`.")
    created_at: float = Field(..., description="Unix time of registration.")
    job_id: str = Field(..., description="The job that trained it.")
    name: str | None = Field(None, description="The job's name, if given.")
    method: str = Field(..., description="Adaptation method.")
    mode: str = Field("cache", description="Execution mode it was trained in: cache, images, tail or online.")
    backbone: str = Field(..., description="timm backbone name.")
    video: VideoSpec | None = Field(
        None, description="A model trained on videos: its clips (`backbone.video`); predict takes videos. Null: images."
    )
    classes: list[str] = Field(..., description="Class labels (tags, for a multi-label model), in output order.")
    multi_label: bool = Field(
        False, description="Multi-label: one sigmoid score per tag; predict returns the tags over `threshold`."
    )
    threshold: float | None = Field(
        None, description="Multi-label: the score from which a tag is predicted, chosen on validation (best micro-F1)."
    )
    metrics: dict[str, Any] = Field(
        ...,
        description="Validation figures of the selected model (`val_accuracy`, or `val_map` for multi-label; "
        "optimistic: they selected it), its test figures (`test_*`, when the job had a test split), parameter "
        "counts, timings, the per-epoch curve (`history`), and for a sweep every configuration's score and curve "
        "(`sweep`).",
    )
    evaluation: EvaluationSummary | None = Field(
        None,
        description="Summary of the evaluation report (`GET /models/{id}/evaluation`): the split it was computed on "
        "(`test`, or `val` when the job had no test split), its image count and headline figures.",
    )
    plots: list[str] = Field(
        default_factory=list, description="Names of the model's PNG plots: `GET /models/{id}/plots/{name}.png`."
    )
    size_bytes: int | None = Field(
        None, description="Bytes of the model's files, counted against its key's SIDETUNE_KEY_QUOTA_ARTIFACTS_GB."
    )


class PerClass(BaseModel):
    class_: str = Field(..., alias="class", description="Class (or tag) name.")
    precision: float = Field(..., description="Precision on the split.")
    recall: float = Field(..., description="Recall on the split.")
    f1: float = Field(..., description="F1 score on the split.")
    support: int = Field(..., description="Images of this class (with this tag) in the split.")
    average_precision: float | None = Field(None, description="Multi-label: the tag's average precision.")


class SparseConfusion(BaseModel):
    format: Literal["coo"] = Field("coo", description="Triples: cell (true[i], predicted[i]) holds count[i].")
    shape: list[int] = Field(..., description="[classes, classes].")
    true: list[int] = Field(..., description="True class of each cell (an index into the model's `classes`).")
    predicted: list[int] = Field(..., description="Predicted class of each cell (an index into the model's `classes`).")
    count: list[int] = Field(..., description="Images in each cell; cells not listed hold none.")


class Confusion(BaseModel):
    true: str = Field(..., description="The true class.")
    predicted: str = Field(..., description="The class predicted instead.")
    count: int = Field(..., description="Images of `true` predicted as `predicted`.")


class Evaluation(BaseModel):
    split: Literal["test", "val"] = Field(
        ...,
        description="`test`: the held-out test split, seen once; `val`: the validation split (no test split was "
        "given), which selected the model, so its figures are optimistic.",
    )
    images: int = Field(..., description="Images evaluated.")
    offset: int = Field(0, description="The page's first class (row).")
    limit: int = Field(..., description="Classes (rows) a page holds at most.")
    total: int = Field(..., description="Classes (tags) in the whole report.")
    has_more: bool = Field(..., description="Classes after this page: ask for `offset + limit`.")
    classes: list[str] = Field(
        ..., description="The page's class (tag) names, in the model's order: rows `offset` on of the confusion matrix."
    )
    metrics: dict[str, float] = Field(
        ...,
        description="`<split>_accuracy`, `_balanced_accuracy`, `_top5_accuracy` (more than 5 classes), "
        "`_macro_f1`; multi-label: `<split>_map`, `_micro_f1`, `_macro_f1`. scikit-learn's metrics.",
    )
    per_class: list[PerClass] = Field(..., description="The page's classes: precision, recall, F1, support.")
    confusion_matrix: list[Any] | None = Field(
        None,
        description="The page's rows of the confusion matrix: rows: true class, columns: predicted class (every "
        "class; counts); at most 100 classes. Multi-label: per tag [[tn, fp], [fn, tp]], whatever the tag count.",
    )
    confusion: SparseConfusion | None = Field(
        None,
        description="Above 100 classes, instead of `confusion_matrix`: the cells that are not zero whose true "
        "class is on the page.",
    )
    top_confusions: list[Confusion] | None = Field(
        None,
        description="Single-label: the 20 most frequent confusions (true -> predicted, off the diagonal) of the "
        "whole report.",
    )
    threshold: float | None = Field(None, description="Multi-label: the decision threshold used.")


class ModelList(BaseModel):
    object: Literal["list"] = Field("list", description="Always `list`.")
    data: list[Model] = Field(..., description="Models, newest first.")


class Instance(BaseModel):
    image_b64: str | None = Field(None, description="An image file (PNG, JPEG, ...) encoded as base64.")
    video_b64: str | None = Field(
        None,
        description="A video file (mp4, avi, mkv, webm, mov) encoded as base64, for a model trained on videos: decoded "
        "and sampled into one clip as its training data was. At most SIDETUNE_MAX_PREDICT_VIDEO_MB (413) and "
        "SIDETUNE_MAX_PREDICT_VIDEO_S seconds (400).",
    )

    @model_validator(mode="after")
    def _one(self) -> Instance:
        if (self.image_b64 is None) == (self.video_b64 is None):
            raise ValueError("give `image_b64` or `video_b64`, one of them")
        return self


class PredictRequest(BaseModel):
    instances: list[Instance] = Field(
        ..., min_length=1, max_length=256, description="Images (or videos) to classify, all of one kind."
    )
    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        strict=True,
        allow_inf_nan=False,
        description="Multi-label models: return the tags "
        "scoring at least this (default: the model's threshold, chosen on validation); a number (not a string or a "
        "boolean). A single-label model refuses it (422).",
    )
    top_k: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="Return only the `top_k` highest scores of each instance, highest first "
        "(default: every class's score, in the model's order).",
    )


class MultiPredictRequest(PredictRequest):
    models: list[str] = Field(
        ...,
        description="The models to answer, by id (at least one, each once, at most SIDETUNE_MAX_PREDICT_MODELS), all "
        "trained on images or all on videos. The instances are decoded once and pass through each backbone once for "
        "every model on it.",
    )


class Prediction(BaseModel):
    label: str = Field(..., description="The most likely class (multi-label: the highest-scoring tag).")
    scores: dict[str, float] = Field(
        ..., description="Probability of every class (multi-label: each tag's own probability, a sigmoid)."
    )
    labels: list[str] | None = Field(None, description="Multi-label models: the tags scoring at least the threshold.")


class PredictResponse(BaseModel):
    model_id: str = Field(..., description="The model that answered.")
    predictions: list[Prediction] = Field(..., description="One per instance, in order.")


class MultiPredictResponse(BaseModel):
    results: list[PredictResponse] = Field(..., description="One per model, in the order of `models`.")


class Health(BaseModel):
    status: str = Field(..., description="`ok` when the process serves requests.")


class Ready(BaseModel):
    status: Literal["ready", "not_ready"] = Field(
        ..., description="`ready` when Redis answers and takes writes and both queues have workers."
    )
    redis: bool = Field(..., description="Redis answered a ping.")
    redis_writable: bool = Field(
        ..., description="Redis took a write (false while it refuses writes: a failed AOF write, `MISCONF`; `OOM`)."
    )
    workers: dict[str, int] = Field(..., description="Live workers per queue (heartbeats).")
    reason: str | None = Field(None, description="Why it is not ready; null when it is.")


class Dataset(BaseModel):
    id: str = Field(..., description="Dataset id (`ds_...`); a job uses it as `dataset.id`.")
    object: Literal["dataset"] = Field("dataset", description="Always `dataset`.")
    name: str | None = Field(None, description="The uploaded archive's file name (or the `name` form field).")
    format: Literal["imagefolder", "csv"] = Field(
        ..., description="`imagefolder` (one folder per class) or `csv` (a manifest `path,label` at the top)."
    )
    num_images: int = Field(..., description="Images found (files with an image suffix; not decoded yet).")
    classes: list[str] = Field(..., description="Class labels, sorted.")
    size_bytes: int = Field(..., description="Bytes of the extracted files on the server.")
    created_at: float = Field(..., description="Unix time of the upload.")


class DatasetList(BaseModel):
    object: Literal["list"] = Field("list", description="Always `list`.")
    data: list[Dataset] = Field(..., description="Datasets, newest first.")


class CacheMeta(TypedDict, total=False):
    """What a complete entry's metadata says of it (empty while it is written); keys in the order api/routes/cache.py
    writes them."""

    backbone: Annotated[str, Field(description="The backbone's timm name.")]
    layers: Annotated[list[int], Field(description="The 0-based blocks cached.")]
    token_mode: Annotated[Literal["all", "cls", "mean"], Field(description="Tokens cached per layer.")]
    shape: Annotated[list[int], Field(description="The features' shape: [images, layers, tokens, dim].")]
    codec: Annotated[Literal["none", "zstd", "blosc"], Field(description="The compression of the shards.")]


class CacheEntryInfo(BaseModel):
    key: str = Field(..., description="The entry's key, `<family>/<variant>` (`DELETE /cache/{key}` takes it).")
    bytes: int = Field(..., description="Bytes it takes on the cache's disk or store.")
    complete: bool = Field(..., description="Whole and usable; false while being written (or left by a failure).")
    last_used: float | None = Field(None, description="Unix time a job last read it; null if never read.")
    pinned_by: list[str] = Field(..., description="Jobs reading it now (it cannot be deleted or evicted meanwhile).")
    extracting: str | None = Field(None, description="The job writing it now, if any.")
    meta: CacheMeta = Field(default_factory=dict, description="Backbone, layers, tokens and shape, if written.")


class CacheList(BaseModel):
    object: Literal["list"] = Field("list", description="Always `list`.")
    data: list[CacheEntryInfo] = Field(..., description="Every entry, least recently used first.")
    bytes: int = Field(..., description="Bytes of every entry together.")
    quota_bytes: int | None = Field(None, description="SIDETUNE_CACHE_QUOTA_GB in bytes; null: none.")
    free_disk_bytes: int | None = Field(None, description="Free space on the cache's disk; null on an object store.")


class MethodInfo(BaseModel):
    name: str = Field(..., description="The method's name, as a job spec's `method.name`.")
    kind: Literal["side", "adapted"] = Field(
        ..., description="`side`: trained on the backbone's activations (cached); `adapted`: trained through it."
    )
    modes: list[str] = Field(..., description="The execution modes it runs in; the first is its default.")
    description: str = Field(..., description="What it trains, in a line.")


class Catalog(BaseModel):
    methods: list[MethodInfo] = Field(..., description="Every method a job may name, `auto` first.")
    default_method: str = Field("auto", description="The method a new job takes unless told otherwise.")
    backbones: list[str] = Field(
        ..., description="The timm ViT names the API accepts as `backbone.name` (a pretrained tag may follow: `.tag`)."
    )
    default_backbone: str = Field(..., description="A backbone to start from.")
