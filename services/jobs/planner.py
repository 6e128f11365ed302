"""The planner: what a job will cost before it runs. How large its feature cache is, whether that fits the cache
quota (after evicting least recently used entries), whether its training features fit in memory and on the GPU,
and about how long extraction takes. `sidetune plan SPEC.json` prints it, `POST /jobs?dry_run=true` returns it,
and the plan step fails a job whose cache cannot fit, saying what to change (services/jobs/planning.py; plan_text.py:
the plan as text).

Torch-free, so the API can plan: the backbone's shape comes from a table of timm's plain ViT families (checked
against timm in the tests), not from building the model. A backbone outside the table is planned without sizes
("unknown until extraction") and never refused. Sizes are decimal (1 GB = 10^9 bytes); the `*_mb` budgets of
the settings are MiB, as the trainer reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.architectures import Architecture, architecture, forward_flops
from services.backprop import BackpropMemory, backprop_memory
from services.data.datasets import Dataset
from services.jobs.plan import Plan
from services.jobs.plan_text import GB, gb, human_bytes
from services.jobs.resolved import MIB, ResolvedJob, resolve  # noqa: F401 - MIB: the budgets' unit, as before
from services.modality import Modality, modality_for
from services.spec import JobSpec
from storage.settings import Settings


def lossy_fraction(codec: str, keepbits: int | None) -> float | None:
    """A rough size ratio of a cache whose float16 mantissas are rounded to `keepbits` bits (of 10) and then
    compressed: the dropped bits compress away, sign and exponent are counted whole, (6 + keepbits) / 16. Measured
    with blosc on ViT activations it overestimates by 5-20%. None: no lossy reduction (lossless codecs save ~10%,
    not counted, or BitRound without a codec, which saves nothing)."""
    if keepbits is None or codec == "none":
        return None
    return (6 + keepbits) / 16


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
    """Plan `spec` under `settings` (`plan_job`'s plan)."""
    return plan_job(spec, settings)[0]


def plan_job(spec: JobSpec, settings: Settings) -> tuple[Plan, ResolvedJob]:
    """Resolve `spec` (services/jobs/resolved.py: what the workers then read instead of deciding again) and plan it
    under `settings`. Raises ForbiddenPath (a PermissionError, services/paths.py) or FileNotFoundError for a dataset
    path the caller may not read or that is missing, DatasetError (a ValueError) for an unusable dataset, and
    ValueError for cached layers or tokens the backbone or method rule out."""
    resolved, dataset = resolve(spec, settings)
    return _plan(spec, settings, resolved, dataset), resolved


def _plan(spec: JobSpec, settings: Settings, resolved: ResolvedJob, dataset: Dataset) -> Plan:
    """The costs of the resolved job: cache size and fit, memory, extraction time."""
    arch = architecture(spec.backbone.name, spec.backbone.image_size, spec.backbone.video)
    disk = _Disk(settings)
    modality = modality_for(spec.backbone)
    notes = _dataset_notes(dataset, modality)
    base = _common_fields(spec, settings, resolved, len(dataset), arch, disk)
    memory = backprop_memory(spec, arch, settings.device_memory_gb)
    if memory is not None:
        base.update(backprop_memory_bytes=memory.need, memory_fits=memory.fits)
        if memory.fits is False:
            fits = None if spec.needs_cache else True
            return Plan(**base, fits=fits, message=memory_message(memory), notes=notes)
    if not spec.needs_cache:  # the dataset's samples called what they are: images, clips
        msg = f"mode {spec.mode} trains on {modality.items} and needs no feature cache; nothing is extracted"
        return Plan(**base, fits=True, message=msg, notes=notes)
    if arch is None:
        msg = (
            f"the cache size for {spec.backbone.name} is unknown until extraction (the planner knows timm's plain "
            "ViT families only); the job is not refused for it"
        )
        return Plan(**base, fits=None, message=msg, notes=notes)
    return _cache_plan(spec, settings, resolved, dataset, arch, disk, base, notes)


def _tflops(settings: Settings) -> float:
    """The compute rate extraction time is estimated at: the CPU's on device cpu, else a GPU's."""
    return settings.planner_cpu_tflops if settings.device == "cpu" else settings.planner_gpu_tflops


def _dataset_notes(dataset: Dataset, modality: Modality) -> list[str]:
    """The notes on the dataset itself: rows left out, and its kind's (clips counted as images)."""
    notes: list[str] = []
    if dataset.left_out:  # how many of each kind, the first of them, and how many more
        notes.append(dataset.left_out.text())
    return notes + modality.dataset_notes()  # the kind resolve checked the dataset against


def _common_fields(
    spec: JobSpec, settings: Settings, resolved: ResolvedJob, n: int, arch: Architecture | None, disk: _Disk
) -> dict[str, object]:
    """The fields of every plan, whatever its verdict: the job, its dataset and split, the cache's state, the
    assumed rates and the memory budgets."""
    return dict(
        backbone=spec.backbone.name,
        method=spec.method.name,
        mode=spec.mode,
        needs_cache=spec.needs_cache,
        images=n,
        train_images=resolved.split.train,
        val_images=resolved.split.val,
        test_images=resolved.test_images,
        classes=resolved.classes,
        configurations=resolved.configurations,
        architecture=arch,
        quota_bytes=disk.quota,
        free_disk_bytes=disk.free,
        cache_used_bytes=disk.used,
        cache_evictable_bytes=disk.evictable,
        available_bytes=disk.space_max(),
        assumed_tflops=_tflops(settings),
        assumed_disk_mb_s=settings.planner_disk_mb_s,
        train_memory_budget_bytes=resolved.budgets.host_bytes,
        gpu_budget_bytes=resolved.budgets.gpu_bytes,
    )


def memory_message(memory: BackpropMemory) -> str:
    """Why backpropagation does not fit the device memory, and what would make it fit."""
    return (
        f"{memory.reason}: about {gb(memory.need)} of device memory, more than SIDETUNE_DEVICE_MEMORY_GB "
        f"({gb(memory.limit)}). Change one of: {_join(memory.remedies)}."
    )


@dataclass(frozen=True)
class _CacheSize:
    """The feature cache the job would write: what it holds and how large it is."""

    layers: list[int]
    tokens: str  # the token mode: all, cls or mean
    stored: int  # tokens stored per layer and image
    per_image: int  # uncompressed bytes per image
    upper: int  # uncompressed bytes of the whole cache: an upper bound
    frac: float | None  # the lossy codec's rough size ratio; None: none
    expected: int  # the size the fit is judged on


def _cache_size(spec: JobSpec, resolved: ResolvedJob, arch: Architecture, n: int) -> _CacheSize:
    """The cache of `n` images in the resolved layers and tokens, and its expected size under the codec."""
    layers, tokens = resolved.cached_layers, resolved.cached_token_mode
    stored = arch.tokens if tokens == "all" else 1
    per_image = len(layers) * stored * arch.dim * 2
    upper = n * per_image
    frac = lossy_fraction(spec.extraction.codec, spec.extraction.keepbits)
    expected = upper if frac is None else int(upper * frac)
    return _CacheSize(layers, tokens, stored, per_image, upper, frac, expected)


def _cache_plan(
    spec: JobSpec,
    settings: Settings,
    resolved: ResolvedJob,
    dataset: Dataset,
    arch: Architecture,
    disk: _Disk,
    base: dict[str, object],
    notes: list[str],
) -> Plan:
    """The plan of a job that extracts a cache of a known size: its fit, training memory and extraction time."""
    modality, n = modality_for(spec.backbone), len(dataset)
    cache = _cache_size(spec, resolved, arch, n)
    cpu = settings.device == "cpu"
    needed, _ = spec.method_needs(arch.num_layers, arch.global_pool)
    train_bytes = resolved.split.train * len(needed) * cache.stored * arch.dim * 2
    in_memory = train_bytes <= resolved.budgets.host_bytes
    gpu_budget = resolved.budgets.gpu_bytes  # unknown here without a cap: the worker reads its device's free memory
    on_gpu = None if gpu_budget is None and not cpu else (in_memory and not cpu and train_bytes <= gpu_budget)
    flops = forward_flops(arch, n)
    compute_s = flops / (_tflops(settings) * 1e12)
    write_s = cache.expected / (settings.planner_disk_mb_s * 1e6)
    room = disk.space_max()
    fits = room is None or cache.expected <= room
    evict_bytes, evict_entries = disk.to_evict(cache.expected) if fits else (0, 0)
    msg = _cache_message(spec, arch, n, modality.items, cache, disk, room, (evict_bytes, evict_entries))
    notes.extend(modality.cache_notes(cache.per_image, human_bytes))
    notes.extend(_cost_notes(settings))
    return Plan(
        **base,
        cached_layers=cache.layers,
        cached_token_mode=cache.tokens,
        cached_tokens=cache.stored,
        bytes_per_image=cache.per_image,
        cache_bytes=cache.upper,
        expected_cache_bytes=cache.expected,
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


def _shape(spec: JobSpec, arch: Architecture, n: int, items: str, cache: _CacheSize) -> str:
    """The cache's size as a product, and how a codec changes it."""
    shape = f"{n} {items} x {len(cache.layers)} layers x {cache.stored} tokens x {arch.dim} x 2 B"
    if cache.frac is not None:
        shape += f"; about {gb(cache.expected)} with keepbits {spec.extraction.keepbits}, a rough estimate"
    elif spec.extraction.codec != "none":
        shape += f"; an upper bound, {spec.extraction.codec} compresses it somewhat"
    return shape


def _limit(disk: _Disk) -> str:
    """What limits the cache (the quota, the disk's free space, or nothing on an object store) and what it uses."""
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
    return limit


def _cache_message(
    spec: JobSpec,
    arch: Architecture,
    n: int,
    items: str,
    cache: _CacheSize,
    disk: _Disk,
    room: int | None,
    evict: tuple[int, int],
) -> str:
    """The verdict: the cache fits (after evicting `evict`: bytes, entries), or what to change so that it would."""
    needs = f"the feature cache for this job needs {gb(cache.upper)} ({_shape(spec, arch, n, items, cache)})"
    limit = _limit(disk)
    if room is None or cache.expected <= room:
        msg = f"{needs}; it fits: {limit}"
        evict_bytes, evict_entries = evict
        if evict_entries:
            msg += f"; fits after evicting {gb(evict_bytes)} ({evict_entries} least recently used entries)"
        return msg
    remedies = _remedies(spec, arch, n, cache.layers, cache.tokens, room, disk, cache.expected)
    return f"{needs}; {limit}, so at most {gb(room)} can be made available. Change one of: {_join(remedies)}."


def _cost_notes(settings: Settings) -> list[str]:
    """The notes on a cache's size and extraction time: what they assume and leave out (after its kind's)."""
    notes = [
        "sizes are for a fresh extraction: a complete cache of the same dataset and weights would be reused "
        "instead, which the planner does not check (that needs the weights' hash)"
    ]
    device = "device cpu" if settings.device == "cpu" else "a GPU"
    notes.append(
        f"extraction time assumes {_tflops(settings):g} TFLOP/s ({device}) and "
        f"{settings.planner_disk_mb_s:g} MB/s of disk writes; image decoding is not counted"
    )
    if settings.device == "auto":
        notes.append("device auto: a GPU is assumed for the time and GPU-resident training")
    return notes
