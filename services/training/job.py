"""A job's training, shared by every method and execution mode (`train_job`): the data (cached features, images, or
images through the frozen backbone), the model or every configuration of its sweep (services/training/sweeps/), the
sources of mini-batches, then the loop (services/training/fit.py: each mini-batch read once for all configurations,
the best on validation kept) and one evaluation of the selected model on the test split. The linear probe in cache mode
is solved instead, by the standard protocol (services/training/probes.py).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services import methods
from services.backbones import SplitTransform, load_backbone
from services.data.datasets import (
    DatasetError,
    check_test,
    check_validation,
    read_for_job,
    read_test_set,
    split,
)
from services.data.loading import loader_workers
from services.data.sources import CacheSource, ImageSource, OnlineSource, PooledSource, Source
from services.jobs.progress import Reporter
from services.methods.readout import FeatureInfo
from services.paths import UserPaths
from services.spec import JobSpec
from services.spec.sweep import check_size
from services.training import halving
from services.training.auto import train_auto
from services.training.fit import fit, predict, predicted_labels, select
from services.training.objectives import Objective
from services.training.probes import solve_probes
from services.training.runs import Runs, autocast, to_numpy, to_torch  # noqa: F401 - to_numpy/to_torch: the tests' helpers
from services.training.sweeps.stacked import make_runs
from services.video.loading import clip_transform, epoch_reader, padding_event
from services.video.spec import check_inputs
from storage.cache import FeatureCache
from storage.settings import Settings
from storage.store import Folder

FEATURE_KEYS = ("num_layers", "dim", "num_prefix_tokens", "global_pool", "norm_eps")


def memory_budgets(settings: Settings, device: str) -> tuple[int, int]:
    """(host, device) bytes that cached features may take while training: half the RAM available now and the device's
    free memory less a reserve for the model, activations and the allocator (a fifth of the device or 2 GiB, the
    larger), each capped by its setting when set."""
    host = settings.train_host_budget_bytes()
    if not device.startswith("cuda"):
        return host, 0
    free, total = torch.cuda.mem_get_info(torch.device(device))
    dev = max(0, free - max(total // 5, 2 * 2**30))
    if settings.gpu_cache_mb is not None:
        dev = min(dev, settings.gpu_cache_mb * 2**20)
    return host, dev


@dataclass
class Data:
    """What a job trains from: the cache entry (cache, tail), the dataset (images, online), the backbone (modes
    that run it), and the labels of every image with the indices that can be used."""

    meta: dict[str, Any]
    labels: np.ndarray
    classes: list[str]
    usable: np.ndarray
    tokens: str  # the tokens the inputs hold: what the cache holds, else every token
    skipped_rows: int = 0  # multi-label manifest rows without a tag, left out (on_corrupt=skip)
    entry: Any = None
    dataset: Any = None
    backbone: Any = None


def _data(spec: JobSpec, settings: Settings, cache_key: str | None) -> Data:
    mode, device = spec.mode, settings.torch_device()
    entry = backbone = dataset = None
    if spec.needs_cache:
        if not cache_key:
            raise RuntimeError(f"mode {mode!r} needs the feature cache, and the extraction step left none")
        entry = FeatureCache(settings.cache_location).entry(cache_key)
        meta = entry.meta
        labels, valid, classes = entry.labels(), entry.valid(), meta["classes"]
        if not valid.all() and spec.dataset.on_corrupt == "fail":
            bad = entry.summary.get("skipped", [])[:3]
            raise DatasetError(
                f"{int((~valid).sum())} images in the cache could not be decoded (e.g. {bad}); "
                "set dataset.on_corrupt='skip' to train without them"
            )
        usable = np.flatnonzero(valid)
    else:
        ds = spec.dataset
        dataset = read_for_job(ds, UserPaths(settings))
        check_inputs(spec.backbone.video, dataset.kind, ds.path)
        labels, classes, usable = dataset.labels, dataset.classes, np.arange(len(dataset))
    if mode != "cache" or spec.dataset.test:  # a separate test set runs through the backbone, whatever the mode
        ckpt = UserPaths(settings).checkpoint(spec.backbone)  # checked again: the file may have changed
        # frozen (its forward's precision, as the cache was written) in cache and online modes; trained through in
        # images and tail modes (fp32 weights, autocast)
        precision = None if mode in ("cache", "online") else "fp32"
        backbone = load_backbone(spec.backbone, device, ckpt, precision=precision)
        if entry is None:
            meta = backbone.info()
        elif backbone.weights_hash != entry.meta["weights_hash"]:
            raise RuntimeError("the backbone's weights changed since the features were cached")
    tokens = entry.meta["token_mode"] if entry is not None else "all"
    skipped = len(entry.meta.get("skipped_rows", [])) if entry is not None else len(dataset.skipped_rows)
    return Data(meta, labels, classes, usable, tokens, skipped, entry, dataset, backbone)


def _build(spec: JobSpec, data: Data, vit: torch.nn.Module | None) -> torch.nn.Module:
    if type(spec.method).kind == "side":
        readout = data.entry.readout() if spec.mode == "cache" else data.backbone.readout_tensors()
        info = FeatureInfo.from_meta(data.meta, readout, len(data.classes), data.tokens)
        return methods.build(spec.method, info)
    tail = spec.execution.tail_blocks if spec.mode == "tail" else None
    return methods.build(spec.method, vit, len(data.classes), tail)


def _sources(
    spec: JobSpec, settings: Settings, data: Data, parts: list[np.ndarray], layers: list[int] | None, train: bool = True
):
    """One input source per index array of `parts`, and a description of where the inputs come from. With `train`
    the first part is the training split (augmented, clips jittered in time); every other part is read as evaluated."""
    device, mode = settings.torch_device(), spec.mode
    if data.entry is not None:
        host, dev = memory_budgets(settings, device)
        sources = [CacheSource(data.entry, idx, data.labels[idx], layers, host // 2, device, dev // 2) for idx in parts]
        first = sources[0]
        where = "cached features " + (
            "on the GPU" if first.on_device else "in memory" if first.in_memory else "streamed from the cache"
        )
        return sources, where
    skip = spec.dataset.on_corrupt == "skip"
    backbone = data.backbone
    augment = SplitTransform.of(backbone.train_transform()) if spec.execution.augment else backbone.split
    workers = loader_workers(settings, len(parts[0]))
    # inputs in the frozen forward's dtype online; fp32 for methods trained through the backbone (autocast)
    dtype = backbone.dtype if mode == "online" else torch.float32
    readers = [None] * len(parts)
    if spec.backbone.video is not None:  # clips: jittered in time (and cropped, flipped with augment) to train
        augment = backbone.split  # normalisation on the device, as for images; the clips' transform is below
        readers = [_clip_reader(spec, data.dataset, backbone, train=train and i == 0) for i in range(len(parts))]
    transforms = [augment if train and i == 0 else backbone.split for i in range(len(parts))]
    sources = [
        ImageSource(data.dataset, idx, transforms[i], skip, device, workers, dtype, readers[i])
        for i, idx in enumerate(parts)
    ]
    if mode == "online":
        sources = [OnlineSource(s, backbone, layers) for s in sources]
    inputs = "clips (jittered in time)" if spec.backbone.video is not None else "images"
    where = f"{inputs}{' (augmented)' if spec.execution.augment else ''}" + (
        ", backbone forward every step" if mode == "online" else ", through the backbone"
    )
    return sources, where


def _report_loading(reporter: Reporter, sources: list[Any]) -> None:
    """What the loaders of image and clip sources met while training (cache sources: the extraction said it)."""
    errors = sorted(set().union(*(getattr(s, "errors", ()) for s in sources)))
    notes = sorted(set().union(*(getattr(s, "notes", ()) for s in sources)))
    if errors:
        reporter.event(
            f"skipped {len(errors)} unreadable file(s) while training: " + "; ".join(errors[:5]), level="warning"
        )
    if padded := padding_event(notes):
        reporter.event(padded, level="warning")


def _clip_reader(spec: JobSpec, dataset: Any, backbone: Any, train: bool):
    """The loaders' reader of clips: jittered in time (and cropped, flipped with augment) to train, fixed otherwise."""
    video, dc, pil = spec.backbone.video, backbone.data_config, backbone.split.pil
    transform = clip_transform(dc, pil, spec.execution.augment) if train else clip_transform(dc, pil)
    return epoch_reader(dataset, transform, spec.dataset.on_corrupt == "skip", video, train)


def _test_set(spec: JobSpec, settings: Settings, data: Data, layers: list[int] | None) -> tuple[Source, np.ndarray]:
    """`dataset.test`: its images through the backbone (and pooled as the cache pools them), and its labels in the
    training set's class order."""
    ds = spec.dataset
    test, targets = read_test_set(ds, UserPaths(settings), data.classes)
    check_inputs(spec.backbone.video, test.kind, ds.test)
    backbone, device = data.backbone, settings.torch_device()
    dtype = torch.float32 if layers is None or spec.mode == "tail" else backbone.dtype  # as the model was trained
    relabelled = dataclasses.replace(test, labels=targets)
    reader = _clip_reader(spec, relabelled, backbone, train=False) if spec.backbone.video is not None else None
    source: Source = ImageSource(
        relabelled,
        np.arange(len(test)),
        backbone.split,
        ds.on_corrupt == "skip",
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


def train_job(
    spec: JobSpec, settings: Settings, cache_key: str | None, reporter: Reporter, checkpoint_dir: Folder | Path
) -> dict[str, Any]:
    """Build the job's model (one per configuration of its sweep) and input sources for its execution mode, train,
    select on validation, evaluate the selected model once on the test split (else on validation, named so);
    returns {"weights", "config", "metrics", "evaluation", "plots"} for the artifact store."""
    from services.training import evaluation, plots

    if spec.method.name == "auto":
        return train_auto(spec, settings, cache_key, reporter, checkpoint_dir)
    grid = spec.grid()
    check_size(grid, settings.max_sweep_configs)
    device, kind, ds = settings.torch_device(), type(spec.method).kind, spec.dataset
    data = _data(spec, settings, cache_key)
    if data.dataset is not None and data.dataset.skipped_rows:  # read here (no cache): say what was left out
        rows = data.dataset.skipped_rows
        reporter.event(
            f"left out {len(rows)} dataset rows, e.g. {rows[0]}", level="warning", data={"left_out": list(rows[:1000])}
        )
    parts = split(data.labels[data.usable], ds.val_fraction, ds.test_fraction, ds.split_seed)
    train_idx, val_idx, test_idx = (data.usable[p] for p in parts)
    check_validation(data.labels[data.usable], val_idx, data.classes)
    check_test(data.labels[data.usable], test_idx, ds.val_fraction, ds.test_fraction)
    configs = spec.configurations()
    hps = [c.training.resolved(c.method.training_defaults(), len(train_idx)) for c in configs]
    hp = hps[0]
    objective = Objective(data.labels[train_idx], len(data.classes), hp.label_smoothing, hp.class_weights, device)

    # every adapted configuration adapts its own copy of the backbone (copied before the first one changes it)
    vits = (
        [None] * len(configs)
        if kind == "side"
        else [data.backbone.model, *(copy.deepcopy(data.backbone.model) for _ in configs[1:])]
    )
    models = []
    for c, vit in zip(configs, vits, strict=True):
        torch.manual_seed(hp.seed)  # each configuration starts as it would in a job of its own
        models.append(_build(c, data, vit).to(device))
    layers = sorted({layer for m in models for layer in (m.input_layers or [])}) or None
    (train_src, val_src), inputs = _sources(spec, settings, data, [train_idx, val_idx], layers)
    if data.entry is not None:
        data.entry.touch()
    what = f"{len(configs)} configurations ({grid.describe()})" if grid else spec.method.name
    if spec.automatic_lrs():
        what += ", the learning rates chosen automatically" + (
            ", the lower half stopping at epochs " + ", ".join(map(str, halving.rungs(hp.epochs)))
            if hp.early_termination
            else ""
        )
    reporter.event(
        f"training {what} in mode {spec.mode} ({models[0].side_parameters():,} side parameters) on {len(train_idx)} "
        f"images, validating on {len(val_idx)}{f', testing on {len(test_idx)}' if len(test_idx) else ''}; inputs: "
        f"{inputs}",
        data={"hyperparameters": hp.model_dump()},
    )
    y_train, y_val = data.labels[train_idx], data.labels[val_idx]
    lbfgs = spec.linear_solver == "lbfgs"
    name = "test" if len(test_idx) or ds.test else "val"
    held_state = None
    if lbfgs:
        results, points, timing, held_state = solve_probes(
            spec,
            configs,
            hps,
            models,
            [train_src, val_src],
            [y_train, y_val],
            objective,
            reporter,
            held_out=objective.multi_label or name == "val",
        )
        owner = [p["config"] for p in points]
    else:
        runs, where = make_runs(models, [c.method.model_dump() for c in configs], hps, objective, device)
        results, timing = fit(
            runs, where, train_src, val_src, len(y_train), len(y_val), hp, objective, reporter, checkpoint_dir, layers
        )
        owner = list(range(len(configs)))
    _report_loading(reporter, [train_src, val_src])
    kept = [i for i, r in enumerate(results) if r.state]  # an L-BFGS path keeps its best point's weights only
    chosen = kept[select([results[i] for i in kept])]
    j = owner[chosen]
    best, best_hp, model, res = configs[j], hps[j], models[j], results[chosen]
    if lbfgs:  # the grid's strength, as the sweep names it (the refit's, per image, is in metrics["refit"])
        best_hp = best_hp.model_copy(update={"weight_decay": points[chosen]["weight_decay"]})
    model.load_trainable(to_torch(res.state))
    final = make_runs([model], [best.method.model_dump()], [best_hp], objective, device)[0]

    # what validation judges has not seen the validation images: the L-BFGS probe's saved model is refitted on them,
    # so the multi-label threshold and a report on validation come from its fit on the training split alone
    judge = final
    if held_state is not None:
        judged = copy.deepcopy(model)
        judged.load_trainable(to_torch(held_state))
        judge = make_runs([judged], [best.method.model_dump()], [best_hp], objective, device)[0]
        timing["refit"]["validation_judged_by"] = "the fit on the training split at the chosen strength"

    # the selected model, once: the multi-label threshold on validation, the report on the test split
    threshold = None
    if objective.multi_label:
        logits, targets = predict(judge, val_src, len(y_val), 256, layers, device)
        threshold = evaluation.choose_threshold(targets, objective.probabilities(logits[0]))
    own = model.input_layers
    if ds.test:
        source, targets = _test_set(spec, settings, data, own)
    elif len(test_idx):
        source, targets = _sources(spec, settings, data, [test_idx], own, train=False)[0][0], data.labels[test_idx]
    else:
        source, targets = val_src, y_val
    read = own if source is not val_src else layers
    scored = judge if source is val_src else final
    if objective.multi_label:
        logits, targets = predict(scored, source, len(targets), 256, read, device)
        report = evaluation.report(targets, objective.probabilities(logits[0]), data.classes, name, threshold)
    else:  # batch by batch: never the [n, C] probabilities whole
        targets, pred, top5 = predicted_labels(scored, source, len(targets), 256, read, objective)
        report = evaluation.label_report(targets, pred, top5, data.classes, name)
    reporter.event(
        f"selected model on the {'test' if name == 'test' else 'validation'} split: "
        + ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items()),
        type="metrics",
        data=report["metrics"],
    )

    metric = objective.metric
    metrics: dict[str, Any] = {
        metric: round(res.score, 5),
        "val_loss": round(res.loss, 5),
        "train_images": int(len(train_idx)),
        "val_images": int(len(val_idx)),
        "test_images": int(len(targets)) if name == "test" else 0,
        "skipped_rows": data.skipped_rows,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "side_params": model.side_parameters(),
        **timing,
    }
    if lbfgs:
        metrics |= {
            "solver": "lbfgs",
            "weight_decay": best_hp.weight_decay,
            "iterations": metrics["refit"]["iterations"],
            "l2_path": points,
        }
    else:
        metrics |= {"best_epoch": res.epoch, "epochs": hp.epochs, "history": res.history}
    if grid:
        overrides = grid.configurations()
        entries = [
            {
                "config": overrides[owner[i]],
                metric: round(r.score, 5),
                "val_loss": round(r.loss, 5),
                **(
                    {"weight_decay": points[i]["weight_decay"]}
                    if lbfgs
                    else {"best_epoch": r.epoch, "history": r.history}
                ),
                **({"stopped_after_epoch": r.stopped} if r.stopped else {}),
            }
            for i, r in enumerate(results)
        ]
        metrics |= {"configurations": len(configs), "selected": overrides[j], "sweep": entries}
        if spec.automatic_lrs():
            d = spec.method.training_defaults()
            metrics["automatic_lr"] = {
                "lrs": spec.automatic_lrs(),
                "rule": f"{d['lr']} x sqrt(batch_size / "
                f"{d['lr_reference_batch']}) x {', '.join(map(str, d['lr_grid']))}",
            }
    if name == "test":
        metrics |= report["metrics"]

    config = {
        "method": best.method.model_dump(),
        "kind": kind,
        "mode": spec.mode,
        "tail_blocks": spec.execution.tail_blocks if spec.mode == "tail" else None,
        "backbone": spec.backbone.model_dump(),
        "weights_hash": data.meta["weights_hash"],
        "data_config": data.meta["data_config"],
        "feature_info": {
            **{k: data.meta[k] for k in FEATURE_KEYS},
            "temporal": data.meta.get("temporal"),
            "tokens": data.meta["tokens"] if data.tokens == "all" else 1,
            "num_classes": len(data.classes),
            "token_mode": data.tokens,
        },
        "input_layers": model.input_layers if kind == "side" else None,
        "input_tokens": data.tokens if kind == "side" else None,
        "classes": data.classes,
        "multi_label": objective.multi_label,
        "threshold": threshold,
        "hyperparameters": best_hp.model_dump(),
        "cache_key": cache_key if data.entry is not None else None,
    }
    return {
        "weights": res.state,
        "config": config,
        "metrics": metrics,
        "evaluation": report,
        "plots": plots.for_job(metrics, report, metric),
    }
