"""A job's plan: what it will cost, computed before it runs (services/jobs/planner.py computes it, plan_text.py prints
it). `POST /jobs?dry_run=true` returns it as it is. Torch-free."""

from __future__ import annotations

from pydantic import BaseModel, Field

from services.architectures import Architecture


class Plan(BaseModel):
    """What a job will cost, computed before it runs."""

    backbone: str = Field(..., description="The backbone's timm name.")
    method: str = Field(..., description="The adaptation method.")
    mode: str = Field(..., description="The execution mode, `auto` resolved.")
    needs_cache: bool = Field(..., description="The mode trains from the feature cache (`cache`, `tail`).")
    images: int = Field(..., description="Images in the dataset (every file is counted; corrupt ones too).")
    train_images: int = Field(..., description="Images in the training split.")
    val_images: int = Field(..., description="Images in the validation split.")
    test_images: int = Field(0, description="Images in the test split (`dataset.test_fraction`); 0 without one.")
    configurations: int = Field(
        1,
        description="Configurations the job trains: 1, or the size of its grid (its sweep and an automatic "
        "learning-rate grid).",
    )
    classes: int = Field(..., description="Classes in the dataset.")
    architecture: Architecture | None = Field(
        None, description="The backbone's shape; null for a backbone outside the planner's table (sizes unknown)."
    )
    cached_layers: list[int] | None = Field(None, description="The 0-based blocks the cache would hold.")
    cached_token_mode: str | None = Field(None, description="Tokens cached per layer: `all`, `cls` or `mean`.")
    cached_tokens: int | None = Field(None, description="Tokens stored per layer and image (T for `all`, else 1).")
    bytes_per_image: int | None = Field(None, description="Uncompressed cache bytes per image: L' x T' x D x 2.")
    cache_bytes: int | None = Field(
        None, description="Uncompressed cache size N x L' x T' x D x 2 bytes, an upper bound (codecs shrink it)."
    )
    expected_cache_bytes: int | None = Field(
        None,
        description="The size the fit is judged on: a rough estimate with a lossy codec (`keepbits`), else the "
        "upper bound.",
    )
    quota_bytes: int | None = Field(None, description="The cache quota (SIDETUNE_CACHE_QUOTA_GB); null: none.")
    free_disk_bytes: int | None = Field(
        ...,
        description="Free space on the disk that holds the cache (the data dir's, or a local `SIDETUNE_CACHE_URL`'s); "
        "null for an object store, which has no such figure.",
    )
    cache_used_bytes: int = Field(..., description="Space the feature cache uses now.")
    cache_evictable_bytes: int = Field(
        ..., description="Of that, complete entries that least-recently-used eviction may remove."
    )
    available_bytes: int | None = Field(
        ...,
        description="The most the job's cache may take: quota and free disk, after evicting every evictable entry; "
        "null when nothing limits it (an object store without a quota).",
    )
    fits: bool | None = Field(
        None,
        description="The cache fits (after eviction if needed); true when the mode needs no cache; null when the "
        "size is unknown until extraction. A job with `false` is refused.",
    )
    evict_bytes: int = Field(0, description="Bytes of least recently used entries to evict before extraction.")
    evict_entries: int = Field(0, description="How many entries that eviction removes.")
    train_feature_bytes: int | None = Field(
        None, description="Cached features the training split reads (its layers and tokens), in bytes."
    )
    train_in_memory: bool | None = Field(
        None,
        description="They fit the training split's share of the host memory budget: held in RAM, else streamed "
        "from the cache.",
    )
    train_on_gpu: bool | None = Field(
        None,
        description="They also fit the training split's share of the device budget: GPU-resident training (on "
        "a GPU device); null when the budget is only known on the worker's device (no SIDETUNE_GPU_CACHE_MB cap).",
    )
    train_memory_budget_bytes: int = Field(
        ...,
        description="The training split's share (half) of the host budget: half the RAM available here now, "
        "capped by SIDETUNE_TRAIN_MEMORY_MB.",
    )
    gpu_budget_bytes: int | None = Field(
        None,
        description="The training split's share (half) of SIDETUNE_GPU_CACHE_MB; null: no cap, the worker "
        "derives it from its device's free memory.",
    )
    backprop_memory_bytes: int | None = Field(
        None,
        description="Methods trained through the backbone (modes `images` and `tail`): the device memory of a training "
        "step at `training.batch_size`, roughly (weights, gradients and optimizer state of full fine-tuning, the "
        "activations the backward pass keeps). Null for the others or a backbone outside the planner's table.",
    )
    memory_fits: bool | None = Field(
        None,
        description="That estimate fits SIDETUNE_DEVICE_MEMORY_GB; null when the setting is unset or there is no "
        "estimate. A job with `false` is refused (422 `does_not_fit_memory`).",
    )
    extraction_flops: float | None = Field(None, description="FLOPs of the backbone forwards over every image.")
    extraction_compute_s: float | None = Field(None, description="Forward time at the assumed throughput.")
    extraction_write_s: float | None = Field(None, description="Cache write time at the assumed disk bandwidth.")
    extraction_s: float | None = Field(
        None, description="Estimated extraction time: the larger of compute and write (they overlap)."
    )
    assumed_tflops: float = Field(
        ..., description="Throughput assumed (SIDETUNE_PLANNER_GPU_TFLOPS, or _CPU_TFLOPS with device=cpu)."
    )
    assumed_disk_mb_s: float = Field(..., description="Write bandwidth assumed (SIDETUNE_PLANNER_DISK_MB_S).")
    message: str = Field(..., description="A summary; when the cache cannot fit, what to change.")
    notes: list[str] = Field(default_factory=list, description="What the plan assumes or leaves out.")
