"""The resolved job: what is decided about a job once, when it is planned, so that no step decides it again. The spec,
its execution mode, the cached layers and token mode (for a backbone the planner's table knows), the number of
configurations, the train/validation/test split (drawn, or the dataset's own), the training-memory budgets, the
dataset's fingerprint, and the backbone's weights hash (only a worker can compute it: the extract step records it).

`resolve` is the one function that builds it: the planner calls it (services/jobs/planner.py: `plan_job`) in the plan
step, in a worker (services/jobs/planning.py), or in the request for a dry run, and a worker calls it for a job
recorded before resolved jobs existed (`recorded`). It reads the whole dataset, which is why `POST /jobs` leaves it to
the plan step.

The split is kept as one code per image (0 train, 1 validation, 2 test), zlib-compressed: in the job record when
small, else in the store under the job (`ArtifactStore.job`: `jobs/<job_id>/split.bin`, written atomically), the
record keeping the counts and hashes. Training takes it (`training_split`) instead of splitting again; the labels'
fingerprint tells a dataset that changed since.

The budget rule (`memory_budgets`) is here too, for the planner and the trainer alike. Torch-free.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, Field, PrivateAttr

from services.architectures import architecture
from services.data.datasets import Dataset, DatasetError, read_for_job, read_test_set
from services.data.splits import check_test, check_validation, given_split, split
from services.modality import modality_for
from services.paths import UserPaths
from services.spec import JobSpec
from services.spec.sweep import check_size
from storage.settings import Settings

if TYPE_CHECKING:
    from services.jobs.progress import Reporter
    from storage.redis import JobRecord, JobStore
    from storage.specs import ResolvedRecord
    from storage.store import Folder

MIB, GIB = 2**20, 2**30
INLINE_BYTES = 8192  # compressed split codes up to this size ride in the job record; larger ones go to the store
SPLIT_FILE = "split.bin"
PARTS = ("train", "val", "test")


class MemoryBudgets(BaseModel):
    """Bytes of cached features each of the training and validation splits may hold while training (each gets half
    of the budget): in host memory, and on the GPU."""

    host_bytes: int = Field(
        ..., description="Half the host budget: half the RAM available, capped by SIDETUNE_TRAIN_MEMORY_MB."
    )
    gpu_bytes: int | None = Field(
        None,
        description="Half the device budget: the device's free memory less a reserve, capped by "
        "SIDETUNE_GPU_CACHE_MB; null where the device is not known (the planner without that cap).",
    )


def memory_budgets(settings: Settings, gpu: tuple[int, int] | None = None) -> MemoryBudgets:
    """The one budget rule. Host: half the RAM available now, capped by `train_memory_mb`. Device, given its (free,
    total) bytes: the free memory less a reserve for the model, activations and the allocator (a fifth of the device or
    2 GiB, the larger), capped by `gpu_cache_mb`; without them (the planner) the cap alone, or unknown. Each of the
    training and validation splits gets half of each."""
    host = settings.train_host_budget_bytes()
    cap = None if settings.gpu_cache_mb is None else settings.gpu_cache_mb * MIB
    device = cap
    if gpu is not None:
        free, total = gpu
        device = max(0, free - max(total // 5, 2 * GIB))
        device = device if cap is None else min(device, cap)
    return MemoryBudgets(host_bytes=host // 2, gpu_bytes=None if device is None else device // 2)


def labels_fingerprint(labels: np.ndarray) -> str:
    """A hash of the labels a split was drawn from (shape and values): another dataset, or the same one changed,
    has another."""
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    return hashlib.sha256(repr(labels.shape).encode() + labels.tobytes()).hexdigest()[:32]


def draw_split(labels: np.ndarray, classes: list[str], ds: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The split of `labels` by the spec's dataset fields (services/data/datasets.py: `split`), refused when it leaves
    no validation image, or no test image where a test fraction asks for one."""
    parts = split(labels, ds.val_fraction, ds.test_fraction, ds.split_seed)
    check_validation(labels, parts[1], classes)
    check_test(labels, parts[2], ds.val_fraction, ds.test_fraction)
    return parts


def dataset_split(dataset: Dataset, ds: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The split of a dataset that brings its own (`Dataset.parts`: a Hugging Face dataset's train, validation and test
    splits; a part it lacks drawn by `given_split`), else `draw_split`'s. Refused where a test split would come from
    two places, or where it leaves no validation image."""
    if dataset.parts is None:
        return draw_split(dataset.labels, dataset.classes, ds)
    own_test = bool((dataset.parts == 2).any())
    if own_test and (ds.test or ds.test_fraction > 0):
        given = "dataset.test" if ds.test else "dataset.test_fraction"
        raise DatasetError(
            f"the dataset has its own test split; leave {given} out, or set dataset.huggingface.splits to 'draw'",
            field=given,
        )
    parts = given_split(dataset.parts, dataset.labels, ds.val_fraction, ds.test_fraction, ds.split_seed)
    check_validation(dataset.labels, parts[1], dataset.classes)
    if not own_test:
        check_test(dataset.labels, parts[2], ds.val_fraction, ds.test_fraction)
    return parts


def _codes(n: int, parts: tuple[np.ndarray, ...]) -> np.ndarray:
    codes = np.zeros(n, dtype=np.uint8)
    for code, idx in enumerate(parts):
        codes[idx] = code
    return codes


def _sha(codes: np.ndarray) -> str:
    return hashlib.sha256(codes.tobytes()).hexdigest()[:32]


class ResolvedSplit(BaseModel):
    """The train/validation/test split, as drawn once."""

    seed: int = Field(..., description="`dataset.split_seed`.")
    val_fraction: float = Field(..., description="`dataset.val_fraction`.")
    test_fraction: float = Field(..., description="`dataset.test_fraction`.")
    images: int = Field(..., description="Images the split was drawn over (the dataset's, corrupt ones included).")
    train: int = Field(..., description="Images in the training split.")
    val: int = Field(..., description="Images in the validation split.")
    test: int = Field(..., description="Images in the test split.")
    labels_sha: str = Field(..., description="The fingerprint of the labels it was drawn from.")
    parts_sha: str = Field(..., description="The hash of the split's codes (one per image: 0 train, 1 val, 2 test).")
    codes: str | None = Field(None, description="The codes, zlib-compressed and base64, when small; else null.")
    file: str | None = Field(
        None, description="Else the file holding the codes (zlib-compressed) in the job's folder on the store."
    )
    _codes: np.ndarray | None = PrivateAttr(None)

    @classmethod
    def of(cls, labels: np.ndarray, parts: tuple[np.ndarray, ...], ds: Any) -> ResolvedSplit:
        codes = _codes(len(labels), parts)
        packed = zlib.compress(codes.tobytes(), 9)
        small = len(packed) <= INLINE_BYTES
        out = cls(
            seed=ds.split_seed,
            val_fraction=ds.val_fraction,
            test_fraction=ds.test_fraction,
            images=len(labels),
            **{name: len(idx) for name, idx in zip(PARTS, parts, strict=True)},
            labels_sha=labels_fingerprint(labels),
            parts_sha=_sha(codes),
            codes=base64.b64encode(packed).decode() if small else None,
            file=None if small else SPLIT_FILE,
        )
        out._codes = codes
        return out

    def save(self, folder: Folder) -> None:
        """Write the codes into the job's folder when they are not in the record (atomic, idempotent)."""
        if self.file is not None and self._codes is not None:
            folder.write_bytes(self.file, zlib.compress(self._codes.tobytes(), 9))

    def load(self, folder: Folder | None) -> np.ndarray | None:
        """The codes: from the record, the job's folder, or memory; None when the file is missing (the request that
        planned the job ended before writing it). Checked against `parts_sha`."""
        if self._codes is None:
            if self.codes is not None:
                packed = base64.b64decode(self.codes)
            elif folder is not None and self.file is not None and folder.exists(self.file):
                packed = folder.read_bytes(self.file)
            else:
                return None
            codes = np.frombuffer(zlib.decompress(packed), dtype=np.uint8)
            if len(codes) != self.images or _sha(codes) != self.parts_sha:
                raise RuntimeError("the job's recorded split is damaged (its hash does not match); submit it again")
            self._codes = codes
        return self._codes

    def indices(self, labels: np.ndarray, classes: list[str], ds: Any) -> tuple[np.ndarray, ...]:
        """(train, val, test) indices, sorted: from the codes, or drawn again from `labels` (the same labels: the
        caller checked their fingerprint) and checked to be the split recorded."""
        codes = self._codes
        if codes is None:
            codes = _codes(len(labels), draw_split(labels, classes, ds))
            if _sha(codes) != self.parts_sha:
                raise RuntimeError("the split drawn again differs from the job's recorded one; submit the job again")
        return tuple(np.flatnonzero(codes == k).astype(np.int64) for k in range(len(PARTS)))


class ResolvedJob(BaseModel):
    """What a job is, decided once: the record's `resolved` (storage/jobs.py), read by the extract and train steps."""

    spec: JobSpec = Field(..., description="The spec as planned (upload ids resolved to the API's paths).")
    mode: str = Field(..., description="The execution mode, `auto` resolved.")
    needs_cache: bool = Field(..., description="The mode trains from the feature cache.")
    images: int = Field(..., description="Images (or clips) in the dataset.")
    classes: int = Field(..., description="Classes (or tags) in the dataset.")
    test_images: int = Field(..., description="Images the model is tested on: `dataset.test`'s, or the test split's.")
    configurations: int = Field(1, description="Configurations trained: 1, or the size of the job's grid.")
    cached_layers: list[int] | None = Field(
        None, description="The blocks the cache holds; null when there is no cache or the backbone is unknown here."
    )
    cached_token_mode: str | None = Field(None, description="Tokens cached per layer: `all`, `cls` or `mean`.")
    split: ResolvedSplit
    budgets: MemoryBudgets = Field(..., description="The budget rule's figures where the job was resolved.")
    dataset_fingerprint: str | None = Field(None, description="The dataset's (files, sizes, times, labels).")
    weights_hash: str | None = Field(None, description="The backbone's weights hash, recorded by the extract step.")

    def record(self) -> ResolvedRecord:
        """As the job record holds it (storage/specs.py: `ResolvedRecord`)."""
        return self.model_dump(mode="json")


def resolve(spec: JobSpec, settings: Settings) -> tuple[ResolvedJob, Dataset]:
    """Resolve `spec` under `settings`, reading its dataset (and test set): (the resolved job, the dataset read).
    Raises what planner.plan documents: FileNotFoundError, ForbiddenPath, DatasetError, ValueError."""
    ds = spec.dataset
    if ds.path is None or (ds.test_id is not None and ds.test is None):  # the API resolves upload ids to paths
        raise FileNotFoundError(
            f"dataset {ds.id or ds.test_id!r} is an uploaded dataset: plan the job with the API "
            "(POST /jobs?dry_run=true)"
        )
    grid = spec.grid()
    check_size(grid, settings.max_sweep_configs)
    paths = UserPaths(settings)
    dataset = read_for_job(ds, paths)
    modality_for(spec.backbone).check_dataset(dataset.kind, ds.path)
    parts = dataset_split(dataset, ds)
    test_images = len(parts[2])
    if ds.test:  # read now: a test set the model cannot be scored on fails here, not after training
        test_set, _ = read_test_set(ds, paths, dataset.classes)
        modality_for(spec.backbone).check_dataset(test_set.kind, ds.test)
        held_out = set(test_set.paths)  # the training set's files one at a time: a million, never a set of them
        shared = sorted({p for p in dataset.paths if p in held_out})
        if shared:  # a test set must be held out: figures on training images would be optimistic
            raise DatasetError(
                f"dataset.test shares {len(shared)} of its {len(test_set)} files with dataset.path "
                f"(e.g. {shared[0]}); give a test set held out from training, or use "
                "dataset.test_fraction",
                field="dataset.test",
            )
        test_images = len(test_set)
    arch = architecture(spec.backbone.name, spec.backbone.image_size, spec.backbone.video)
    layers = tokens = None
    if spec.needs_cache and arch is not None:
        layers, tokens = spec.cached_layers_and_tokens(arch.num_layers, arch.global_pool)
    resolved = ResolvedJob(
        spec=spec,
        mode=spec.mode,
        needs_cache=spec.needs_cache,
        images=len(dataset),
        classes=len(dataset.classes),
        test_images=test_images,
        configurations=grid.size() if grid else 1,
        cached_layers=layers,
        cached_token_mode=tokens,
        split=ResolvedSplit.of(dataset.labels, parts, ds),
        budgets=memory_budgets(settings),
        dataset_fingerprint=dataset.fingerprint,
    )
    return resolved, dataset


# ---- the workers' side ------------------------------------------------------------------------------------------
def job_folder(settings: Settings, job_id: str) -> Folder:
    """The job's folder on the store, where a large split's codes are."""
    from storage.artifacts import ArtifactStore

    return ArtifactStore.from_settings(settings).job(job_id)


def save_split(settings: Settings, job_id: str, resolved: ResolvedJob) -> None:
    """Write what of `resolved` does not ride in the job record (a large split's codes) into the job's folder."""
    resolved.split.save(job_folder(settings, job_id))


def recorded(
    store: JobStore,
    settings: Settings,
    job: JobRecord,
    local_spec: Callable[[], JobSpec],
    load_split: bool = False,
) -> ResolvedJob:
    """The job's resolved job (with its split's codes loaded if `load_split`): the record's, or, for a job recorded
    without one (before resolved jobs existed), resolved now by the planner's function and recorded. `local_spec`: the
    spec as this machine reads its datasets (called only to resolve)."""
    folder = job_folder(settings, job["id"])
    if job.get("resolved") is not None:
        resolved = ResolvedJob.model_validate(job["resolved"])
        if load_split:
            resolved.split.load(folder)
        return resolved
    resolved, _ = resolve(local_spec(), settings)
    resolved.split.save(folder)  # the codes first: a record never names a file that is not there yet

    def keep_first(record: JobRecord) -> None:
        if record.get("resolved") is None:  # another step may have resolved it meanwhile: the first one stands
            record["resolved"] = resolved.record()

    return recorded(store, settings, store.update_job(job["id"], keep_first), local_spec, load_split)


def record_weights_hash(store: JobStore, job_id: str, weights_hash: str) -> None:
    """Record the backbone's weights hash (only a worker can compute it) in the job's resolved job, unless there."""

    def change(record: JobRecord) -> None:
        if record.get("resolved") is not None:
            record["resolved"]["weights_hash"] = weights_hash

    job = store.get_job(job_id)
    if job.get("resolved") is not None and job["resolved"].get("weights_hash") != weights_hash:
        store.update_job(job_id, change)


def training_split(
    resolved: ResolvedJob | None,
    ds: Any,
    labels: np.ndarray,
    usable: np.ndarray,
    classes: list[str],
    reporter: Reporter,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (train, val, test) indices training uses: the resolved job's split, less the images that cannot be used
    (not decoded into the cache); without a resolved job (train_job called directly), or for labels other than those
    it was drawn from (the dataset changed since), the split drawn here by the same rule. Reported as an event whose
    data carries the hash of the indices used."""
    if resolved is not None and resolved.split.labels_sha == labels_fingerprint(labels):
        parts, source = resolved.split.indices(labels, classes, ds), "the planner's split"
    else:
        if resolved is not None:
            reporter.event(
                "the dataset's labels changed since the job was planned: the split is drawn again from them",
                level="warning",
            )
        parts, source = draw_split(labels, classes, ds), "drawn here"
    keep = np.zeros(len(labels), dtype=bool)
    keep[usable] = True
    if not keep.all():
        parts = tuple(idx[keep[idx]] for idx in parts)
        check_validation(labels[usable], parts[1], classes)
        check_test(labels[usable], parts[2], ds.val_fraction, ds.test_fraction)
    train, val, test = parts
    codes = _codes(len(labels), parts)
    codes[~keep] = len(PARTS)  # left out: the hash equals the planner's when every image is used
    used = _sha(codes)
    reporter.event(
        f"split ({source}): {len(train)} training, {len(val)} validation, {len(test)} test images",
        data={"split": {"train": len(train), "val": len(val), "test": len(test), "parts_sha": used}},
    )
    return train, val, test
