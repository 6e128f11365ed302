"""The planner: what a job will cost before it runs. How large its feature cache is, whether that fits the cache
quota (after evicting least recently used entries), whether its training features fit in memory and on the GPU,
and about how long extraction takes. `sidetune plan SPEC.json` prints it, `POST /jobs?dry_run=true` returns it,
and `POST /jobs` refuses a job whose cache cannot fit, saying what to change (plan_text.py: the plan as text).

Torch-free, so the API can plan: the backbone's shape comes from a table of timm's plain ViT families (checked
against timm in the tests), not from building the model. A backbone outside the table is planned without sizes
("unknown until extraction") and never refused. Sizes are decimal (1 GB = 10^9 bytes); the `*_mb` budgets of
the settings are MiB, as the trainer reads them.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from services.architectures import Architecture, architecture, forward_flops
from services.backprop import backprop_memory
from services.data.datasets import DatasetError, check_test, check_validation, read_for_job, read_test_set, split
from services.jobs.plan_text import GB, gb, human_bytes
from services.paths import UserPaths
from services.spec import JobSpec
from services.spec.sweep import check_size
from services.video.spec import check_inputs
from storage.settings import Settings

MIB = 2**20


def lossy_fraction(codec: str, keepbits: int | None) -> float | None:
    """A rough size ratio of a cache whose float16 mantissas are rounded to `keepbits` bits (of 10) and then
    compressed: the dropped bits compress away, sign and exponent are counted whole, (6 + keepbits) / 16. Measured
    with blosc on ViT activations it overestimates by 5-20%. None: no lossy reduction (lossless codecs save ~10%,
    not counted, or BitRound without a codec, which saves nothing)."""
    if keepbits is None or codec == "none":
        return None
    return (6 + keepbits) / 16


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


class _Disk:
    """The cache's state: usage, evictable entries (least recently used first), quota, and the free space of the disk
    that holds it (a local directory or `file://` URL, wherever it is: the data dir's, `SIDETUNE_CACHE_URL`'s);
    an object store has no free-space figure (`free` None): only the quota limits it there. What eviction would
    remove is storage/cache/eviction.py's `choose`, which the worker runs before extracting."""

    def __init__(self, settings: Settings) -> None:
        from storage.cache import FeatureCache  # zarr, not torch
        from storage.cache.eviction import Room, candidates

        cache = FeatureCache(settings.cache_location)
        self.dir = cache.local_root or settings.cache_location
        self.free = cache.free_bytes()
        entries = cache.entries()
        self.used = sum(e.nbytes() for e in entries)
        self.candidates = candidates(entries)
        self.evictable = sum(c.nbytes for c in self.candidates)
        self.quota = None if settings.cache_quota_gb is None else int(settings.cache_quota_gb * GB)
        self.room = Room(self.used, self.quota, self.free)

    def space_now(self) -> int | None:
        """The most a new entry may take without evicting; None: no limit known."""
        return self.room.available()

    def space_max(self) -> int | None:
        """After evicting every evictable entry."""
        return self.room.without(self.evictable).available()

    @property
    def quota_limits(self) -> bool:
        """The quota, not the disk, is the tighter limit."""
        return self.quota is not None and (self.free is None or self.quota - self.used <= self.free)

    def to_evict(self, nbytes: int) -> tuple[int, int]:
        """(bytes, entries) of least recently used entries to evict so that `nbytes` fit."""
        from storage.cache.eviction import choose

        chosen = choose(self.candidates, nbytes, self.room)
        return sum(c.nbytes for c in chosen), len(chosen)


def _remedies(
    spec: JobSpec, arch: Architecture, n: int, layers: list[int], tokens: str, room: int, disk: _Disk, expected: int
) -> list[str]:
    """The changes that would make the cache fit, with the size each gives; only those that apply."""
    needed, accepted = spec.method_needs(arch.num_layers, arch.global_pool)
    stored = arch.tokens if tokens == "all" else 1
    frac = lossy_fraction(spec.extraction.codec, spec.extraction.keepbits) or 1.0
    per_layer = n * stored * arch.dim * 2  # uncompressed bytes of one cached layer

    def size(n_layers: int, n_tokens: int = stored, f: float = frac) -> str:
        return gb(n * n_layers * n_tokens * arch.dim * 2 * f)

    out = []
    if len(layers) > len(needed):
        out.append(
            f'cache only the blocks the method reads (extraction.layers "auto": {len(needed)} layers instead '
            f"of {len(layers)}, {size(len(needed))})"
        )
    if spec.method.name == "losa" and spec.mode == "cache":
        k = int(room // (per_layer * frac))
        if 1 <= k < len(needed):
            auto = "" if spec.extraction.layers == "auto" else ' with extraction.layers "auto"'
            out.append(
                f"fewer LoSA side layers (method.layers {k}: {k} blocks evenly spaced, ending at the last, "
                f"{size(k)}{auto})"
            )
    pooled = [a for a in accepted if a != "all"]
    if tokens == "all" and pooled:
        out.append(
            f'fewer tokens (extraction.tokens "{pooled[0]}": 1 token per layer instead of {arch.tokens}, '
            f"{size(len(layers), 1)})"
        )
    upper = n * len(layers) * stored * arch.dim * 2
    bits = min(9, math.floor(16 * room / upper) - 6)  # (6 + keepbits) / 16 of the upper bound must fit
    current = spec.extraction.keepbits
    if bits >= 1 and (current is None or spec.extraction.codec == "none" or bits < current):
        codec = spec.extraction.codec if spec.extraction.codec != "none" else "blosc"
        out.append(
            f'a lossy codec (extraction.codec "{codec}" with extraction.keepbits {bits}: about '
            f"{gb(upper * (6 + bits) / 16)}, a rough estimate)"
        )
    others = [m for m in type(spec.method).modes if m not in ("cache", "tail")]
    for mode in others[:1]:
        what = "the backbone runs under no_grad on every step" if mode == "online" else "trains through the backbone"
        out.append(f'no cache at all (execution.mode "{mode}": {what})')
    reserved = disk.used - disk.evictable  # entries that cannot be evicted stay
    if disk.quota_limits and (disk.free is None or disk.free + disk.evictable >= expected):
        out.append(
            f"raise SIDETUNE_CACHE_QUOTA_GB to at least {math.ceil((expected + reserved) / GB * 100) / 100:.2f} (GB)"
        )
    elif disk.quota is None or not disk.quota_limits:
        out.append(
            f"free disk space under {disk.dir}, or put the cache on a larger disk (SIDETUNE_DATA_DIR, or "
            "SIDETUNE_CACHE_URL for the cache alone)"
        )
    return out


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "; ".join(items[:-1]) + "; or " + items[-1]


def plan(spec: JobSpec, settings: Settings) -> Plan:
    """Plan `spec` under `settings`. Raises ForbiddenPath (a PermissionError, services/paths.py) or FileNotFoundError
    for a dataset path the caller may not read or that is missing, DatasetError (a ValueError) for an unusable dataset,
    and ValueError for cached layers or tokens the backbone or method rule out."""
    ds = spec.dataset
    if ds.path is None or (ds.test_id is not None and ds.test is None):  # the API resolves upload ids to paths
        raise FileNotFoundError(
            f"dataset {ds.id or ds.test_id!r} is an uploaded dataset: plan the job with the API "
            "(POST /jobs?dry_run=true)"
        )
    check_size(spec.grid(), settings.max_sweep_configs)
    paths = UserPaths(settings)
    dataset = read_for_job(ds, paths)
    check_inputs(spec.backbone.video, dataset.kind, ds.path)
    n = len(dataset)
    train_idx, val_idx, test_idx = split(dataset.labels, ds.val_fraction, ds.test_fraction, ds.split_seed)
    check_validation(dataset.labels, val_idx, dataset.classes)
    check_test(dataset.labels, test_idx, ds.val_fraction, ds.test_fraction)
    test_images = len(test_idx)
    if ds.test:  # read now: a test set the model cannot be scored on fails here, not after training
        test_set, _ = read_test_set(ds, paths, dataset.classes)
        check_inputs(spec.backbone.video, test_set.kind, ds.test)
        shared = sorted(set(test_set.paths) & set(dataset.paths))
        if shared:  # a test set must be held out: figures on training images would be optimistic
            raise DatasetError(
                f"dataset.test shares {len(shared)} of its {len(test_set)} files with dataset.path "
                f"(e.g. {shared[0]}); give a test set held out from training, or use "
                "dataset.test_fraction",
                field="dataset.test",
            )
        test_images = len(test_set)
    arch = architecture(spec.backbone.name, spec.backbone.image_size, spec.backbone.video)
    cpu = settings.device == "cpu"
    tflops = settings.planner_cpu_tflops if cpu else settings.planner_gpu_tflops
    disk = _Disk(settings)
    notes: list[str] = []
    if dataset.skipped_rows:
        notes.append(
            f"{len(dataset.skipped_rows)} dataset rows are left out (repeated files; with on_corrupt=skip, "
            f"missing files and rows without a tag), e.g. {dataset.skipped_rows[0]}"
        )
    base = dict(
        backbone=spec.backbone.name,
        method=spec.method.name,
        mode=spec.mode,
        needs_cache=spec.needs_cache,
        images=n,
        train_images=len(train_idx),
        val_images=len(val_idx),
        test_images=test_images,
        classes=len(dataset.classes),
        configurations=grid.size() if (grid := spec.grid()) else 1,
        architecture=arch,
        quota_bytes=disk.quota,
        free_disk_bytes=disk.free,
        cache_used_bytes=disk.used,
        cache_evictable_bytes=disk.evictable,
        available_bytes=disk.space_max(),
        assumed_tflops=tflops,
        assumed_disk_mb_s=settings.planner_disk_mb_s,
        train_memory_budget_bytes=settings.train_host_budget_bytes() // 2,
        gpu_budget_bytes=None if settings.gpu_cache_mb is None else settings.gpu_cache_mb * MIB // 2,
    )
    if dataset.kind == "video":
        notes.append("the dataset holds videos: `images` counts clips, one per video (sizes are per clip)")
    memory = backprop_memory(spec, arch, settings.device_memory_gb)
    if memory is not None:
        base.update(backprop_memory_bytes=memory.need, memory_fits=memory.fits)
        if memory.fits is False:
            msg = (
                f"{memory.reason}: about {gb(memory.need)} of device memory, more than SIDETUNE_DEVICE_MEMORY_GB "
                f"({gb(memory.limit)}). Change one of: {_join(memory.remedies)}."
            )
            return Plan(**base, fits=None if spec.needs_cache else True, message=msg, notes=notes)
    if not spec.needs_cache:
        what = "clips" if dataset.kind == "video" else "images"
        msg = f"mode {spec.mode} trains on {what} and needs no feature cache; nothing is extracted"
        return Plan(**base, fits=True, message=msg, notes=notes)
    if arch is None:
        msg = (
            f"the cache size for {spec.backbone.name} is unknown until extraction (the planner knows timm's plain "
            "ViT families only); the job is not refused for it"
        )
        return Plan(**base, fits=None, message=msg, notes=notes)

    layers, tokens = spec.cached_layers_and_tokens(arch.num_layers, arch.global_pool)
    needed, _ = spec.method_needs(arch.num_layers, arch.global_pool)
    stored = arch.tokens if tokens == "all" else 1
    per_image = len(layers) * stored * arch.dim * 2
    upper = n * per_image
    frac = lossy_fraction(spec.extraction.codec, spec.extraction.keepbits)
    expected = upper if frac is None else int(upper * frac)
    train_bytes = len(train_idx) * len(needed) * stored * arch.dim * 2
    in_memory = train_bytes <= base["train_memory_budget_bytes"]  # as services/training/job.py splits the budgets
    gpu_budget = base["gpu_budget_bytes"]  # unknown here without a cap: the worker reads its device's free memory
    on_gpu = None if gpu_budget is None and not cpu else (in_memory and not cpu and train_bytes <= gpu_budget)
    flops = forward_flops(arch, n)
    compute_s = flops / (tflops * 1e12)
    write_s = expected / (settings.planner_disk_mb_s * 1e6)
    room = disk.space_max()
    fits = room is None or expected <= room
    evict_bytes, evict_entries = disk.to_evict(expected) if fits else (0, 0)

    items = "clips" if dataset.kind == "video" else "images"
    shape = f"{n} {items} x {len(layers)} layers x {stored} tokens x {arch.dim} x 2 B"
    if frac is not None:
        shape += f"; about {gb(expected)} with keepbits {spec.extraction.keepbits}, a rough estimate"
    elif spec.extraction.codec != "none":
        shape += f"; an upper bound, {spec.extraction.codec} compresses it somewhat"
    if disk.quota_limits:
        limit = f"the cache quota is {gb(disk.quota)} (SIDETUNE_CACHE_QUOTA_GB)"
    elif disk.free is not None:
        limit = f"the disk under {disk.dir} has {gb(disk.free)} free"
    else:  # an object store: no free-space figure
        limit = (
            f"the cache is on an object store ({disk.dir}), which has no free-space figure: only "
            "SIDETUNE_CACHE_QUOTA_GB would limit it, and it is unset"
        )
    if disk.used:
        limit += f"; the cache uses {gb(disk.used)}, {gb(disk.evictable)} of it evictable"
    if fits:
        msg = f"the feature cache for this job needs {gb(upper)} ({shape}); it fits: {limit}"
        if evict_entries:
            msg += f"; fits after evicting {gb(evict_bytes)} ({evict_entries} least recently used entries)"
    else:
        remedies = _remedies(spec, arch, n, layers, tokens, room, disk, expected)
        msg = (
            f"the feature cache for this job needs {gb(upper)} ({shape}); {limit}, so at most {gb(room)} can be "
            f"made available. Change one of: {_join(remedies)}."
        )
    if arch.num_frames:
        kinetics = human_bytes(240_000 * per_image)
        notes.append(
            f"a video cache is large: {human_bytes(per_image)} per clip here (Kinetics-400's 240k clips "
            f"would take {kinetics}); layer subsets (method.layers, extraction.layers), a lossy codec "
            '(extraction.keepbits) or execution.mode "online" (no cache, the backbone on every step) need '
            "less"
        )
    notes.append(
        "sizes are for a fresh extraction: a complete cache of the same dataset and weights would be reused "
        "instead, which the planner does not check (that needs the weights' hash)"
    )
    notes.append(
        f"extraction time assumes {tflops:g} TFLOP/s ({'device cpu' if cpu else 'a GPU'}) and "
        f"{settings.planner_disk_mb_s:g} MB/s of disk writes; image decoding is not counted"
    )
    if settings.device == "auto":
        notes.append("device auto: a GPU is assumed for the time and GPU-resident training")
    return Plan(
        **base,
        cached_layers=layers,
        cached_token_mode=tokens,
        cached_tokens=stored,
        bytes_per_image=per_image,
        cache_bytes=upper,
        expected_cache_bytes=expected,
        fits=fits,
        evict_bytes=evict_bytes,
        evict_entries=evict_entries,
        train_feature_bytes=train_bytes,
        train_in_memory=in_memory,
        train_on_gpu=on_gpu,
        extraction_flops=flops,
        extraction_compute_s=round(compute_s, 3),
        extraction_write_s=round(write_s, 3),
        extraction_s=round(max(compute_s, write_s), 3),
        message=msg,
        notes=notes,
    )
