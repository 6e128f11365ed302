"""What a job trains from (`load_data`: the cache entry, the dataset, the backbone) and the sources of its
mini-batches per execution mode (`sources`: cached features, images, or images through the frozen backbone; a
separate test set through the backbone, `test_source`), each by what it reads of the job's spec (`Reading`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from services.backbones import Backbone, load_backbone
from services.data.datasets import Dataset, DatasetError, read_for_job, read_test_set
from services.data.formats.left_out import left_out_count, left_out_data
from services.data.loading import loader_workers
from services.data.sources import CacheSource, ImageSource, OnlineSource, PooledSource, Source
from services.jobs.progress import Reporter
from services.jobs.resolved import memory_budgets as budget_rule
from services.modality import modality_for
from services.paths import UserPaths
from services.spec import BackboneSpec, DatasetSpec, JobSpec, Mode
from services.video.loading import padding_event
from storage.cache import CacheEntry, FeatureCache
from storage.cache.meta import EntryDescription
from storage.settings import Settings


def memory_budgets(settings: Settings, device: str) -> tuple[int, int]:
    """(host, device) bytes of cached features each of the training and validation splits may hold: the planner's
    budget rule (services/jobs/resolved.py) with this machine's memory and this device's."""
    cuda = device.startswith("cuda")
    budgets = budget_rule(settings, torch.cuda.mem_get_info(torch.device(device)) if cuda else None)
    return budgets.host_bytes, (budgets.gpu_bytes or 0) if cuda else 0


@dataclass(frozen=True)
class Reading:
    """What reading a job's inputs takes of its spec: the dataset, the backbone, the execution mode (`auto`
    resolved), the blocks adapted in tail mode (None in the others) and whether training images are augmented."""

    dataset: DatasetSpec
    backbone: BackboneSpec
    mode: Mode
    tail_blocks: int | None
    augment: bool

    @classmethod
    def of(cls, spec: JobSpec) -> Reading:
        tail = spec.execution.tail_blocks if spec.mode == "tail" else None
        return cls(spec.dataset, spec.backbone, spec.mode, tail, spec.execution.augment)

    @property
    def needs_cache(self) -> bool:
        return self.mode in ("cache", "tail")

    @property
    def skip_corrupt(self) -> bool:
        return self.dataset.on_corrupt == "skip"


@dataclass(frozen=True)
class Data:
    """What a job trains from: the cache entry (cache, tail), the dataset (images, online), the backbone (modes
    that run it), and the labels of every image with the indices that can be used."""

    meta: EntryDescription  # the cache entry's (its EntryMeta), else the backbone's own (`Backbone.info`)
    labels: np.ndarray
    classes: list[str]
    usable: np.ndarray
    tokens: str  # the tokens the inputs hold: what the cache holds, else every token
    skipped_rows: int = 0  # multi-label manifest rows without a tag, left out (on_corrupt=skip)
    entry: CacheEntry | None = None
    dataset: Dataset | None = None
    backbone: Backbone | None = None


def load_data(reading: Reading, settings: Settings, cache_key: str | None, reporter: Reporter) -> Data:
    """The job's data: the cache entry's labels and the images usable in it (cache and tail modes), else the dataset
    read here (its left-out rows reported); the backbone for every mode that runs it."""
    mode, device, ds = reading.mode, settings.torch_device(), reading.dataset
    entry = backbone = dataset = None
    if reading.needs_cache:
        if not cache_key:
            raise RuntimeError(f"mode {mode!r} needs the feature cache, and the extraction step left none")
        entry = FeatureCache(settings.cache_location).entry(cache_key)
        meta = entry.meta
        labels, valid, classes = entry.labels(), entry.valid(), meta["classes"]
        if not valid.all() and ds.on_corrupt == "fail":
            bad = entry.summary.get("skipped", [])[:3]
            raise DatasetError(
                f"{int((~valid).sum())} images in the cache could not be decoded (e.g. {bad}); "
                "set dataset.on_corrupt='skip' to train without them"
            )
        usable = np.flatnonzero(valid)
    else:
        dataset = read_for_job(ds, UserPaths(settings))
        modality_for(reading.backbone).check_dataset(dataset.kind, ds.path)
        labels, classes, usable = dataset.labels, dataset.classes, np.arange(len(dataset))
    if mode != "cache" or ds.test:  # a separate test set runs through the backbone, whatever the mode
        ckpt = UserPaths(settings).checkpoint(reading.backbone)  # checked again: the file may have changed
        # frozen (its forward's precision, as the cache was written) in cache and online modes; trained through in
        # images and tail modes (fp32 weights, autocast)
        precision = None if mode in ("cache", "online") else "fp32"
        backbone = load_backbone(reading.backbone, device, ckpt, precision=precision)
        if entry is None:
            meta = backbone.info()
        elif backbone.weights_hash != entry.meta["weights_hash"]:
            raise RuntimeError("the backbone's weights changed since the features were cached")
    if dataset is not None and dataset.left_out:  # read here (no cache): say what was left out
        reporter.event(dataset.left_out.text(), level="warning", data=left_out_data(dataset.left_out))
    tokens = entry.meta["token_mode"] if entry is not None else "all"
    skipped = left_out_count(entry.meta) if entry is not None else dataset.left_out.total
    return Data(meta, labels, classes, usable, tokens, skipped, entry, dataset, backbone)


def sources(
    reading: Reading,
    settings: Settings,
    data: Data,
    parts: list[np.ndarray],
    layers: list[int] | None,
    train: bool = True,
) -> tuple[list[Source], str]:
    """One input source per index array of `parts`, and a description of where the inputs come from. With `train`
    the first part is the training split (augmented, clips jittered in time); every other part is read as evaluated."""
    device, mode = settings.torch_device(), reading.mode
    if data.entry is not None:
        host, dev = memory_budgets(settings, device)
        sources: list[Source] = [
            CacheSource(data.entry, idx, data.labels[idx], layers, host, device, dev) for idx in parts
        ]
        first = sources[0]
        where = "cached features " + (
            "on the GPU" if first.on_device else "in memory" if first.in_memory else "streamed from the cache"
        )
        return sources, where
    skip = reading.skip_corrupt
    backbone, modality = data.backbone, modality_for(reading.backbone)
    workers = loader_workers(settings, len(parts[0]))
    # inputs in the frozen forward's dtype online; fp32 for methods trained through the backbone (autocast)
    dtype = backbone.dtype if mode == "online" else torch.float32
    sources = []
    for i, idx in enumerate(parts):  # the training split augmented (clips also jittered in time), the others as is
        split, reader = modality.training_reader(data.dataset, backbone, skip, reading.augment, train and i == 0)
        sources.append(ImageSource(data.dataset, idx, split, skip, device, workers, dtype, reader))
    if mode == "online":
        sources = [OnlineSource(s, backbone, layers) for s in sources]
    where = f"{modality.training_inputs}{' (augmented)' if reading.augment else ''}" + (
        ", backbone forward every step" if mode == "online" else ", through the backbone"
    )
    return sources, where


def report_loading(reporter: Reporter, sources: list[Source]) -> None:
    """What the loaders of image and clip sources met while training (cache sources: the extraction said it)."""
    errors = sorted(set().union(*(getattr(s, "errors", ()) for s in sources)))
    notes = sorted(set().union(*(getattr(s, "notes", ()) for s in sources)))
    if errors:
        reporter.event(
            f"skipped {len(errors)} unreadable file(s) while training: " + "; ".join(errors[:5]), level="warning"
        )
    if padded := padding_event(notes):
        reporter.event(padded, level="warning")


def test_source(
    reading: Reading, settings: Settings, data: Data, layers: list[int] | None
) -> tuple[Source, np.ndarray]:
    """`dataset.test`: its images through the backbone (and pooled as the cache pools them), and its labels in the
    training set's class order."""
    ds = reading.dataset
    test, targets = read_test_set(ds, UserPaths(settings), data.classes)
    modality = modality_for(reading.backbone)
    modality.check_dataset(test.kind, ds.test)
    backbone, device = data.backbone, settings.torch_device()
    dtype = torch.float32 if layers is None or reading.mode == "tail" else backbone.dtype  # as the model was trained
    relabelled = dataclasses.replace(test, labels=targets)
    split, reader = modality.training_reader(relabelled, backbone, reading.skip_corrupt, False, train=False)
    source: Source = ImageSource(
        relabelled,
        np.arange(len(test)),
        split,
        reading.skip_corrupt,
        device,
        loader_workers(settings, len(test)),
        dtype,
        reader,
    )
    if layers is not None:  # side models and tail mode read activations
        source = OnlineSource(source, backbone, layers)
        if data.tokens != "all":
            source = PooledSource(source, data.tokens, backbone.num_prefix_tokens)
    return source, targets
