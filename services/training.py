"""Training, shared by every method and execution mode: mini-batches from a source (cached features, images,
or images through the frozen backbone), SGD or AdamW with linear warmup and cosine decay, validation accuracy
every epoch, the best weights kept.

A checkpoint (current and best trainable weights, optimizer state, epoch) is written after every epoch, so a
killed train worker resumes from the last finished epoch. Frozen backbone weights are never checkpointed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from services import methods
from services.backbones import SplitTransform, load_backbone
from services.datasets import DatasetError, check_path, read_for_job, stratified_split
from services.errors import UserError
from services.loading import loader_workers
from services.methods.readout import FeatureInfo
from services.progress import Reporter
from services.sources import CacheSource, ImageSource, OnlineSource, Source
from services.spec import JobSpec
from services.video.loading import clip_transform, epoch_reader
from services.video.spec import check_inputs
from storage.artifacts import as_folder, tensors_from_bytes, tensors_to_bytes
from storage.cache import FeatureCache
from storage.settings import Settings
from storage.store import Folder


class NonFiniteLoss(UserError):
    """The training loss went NaN or infinite: the job fails and registers no model."""

    code = "non_finite_loss"


FEATURE_KEYS = ("num_layers", "dim", "num_prefix_tokens", "global_pool", "norm_eps")


def to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def to_torch(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _save_checkpoint(where: Folder | Path, epoch: int, model: nn.Module, best: dict, opt: torch.optim.Optimizer,
                     log: dict):  # fmt: skip
    d = as_folder(where)  # on the store: a train worker on another machine resumes from it
    state = {f"model.{k}": v for k, v in to_numpy(model.trainable_state()).items()}
    state |= {f"best.{k}": v for k, v in best.items()}
    opt_state = opt.state_dict()
    for pid, s in opt_state["state"].items():
        for name, value in s.items():
            if torch.is_tensor(value):
                state[f"opt.{pid}.{name}"] = value.detach().cpu().numpy().reshape(value.shape)
    d.write_bytes("checkpoint.safetensors", tensors_to_bytes(state))
    scalars = {pid: {k: v for k, v in s.items() if not torch.is_tensor(v)} for pid, s in opt_state["state"].items()}
    d.write_json(
        "checkpoint.json",
        {"epoch": epoch, "param_groups": opt_state["param_groups"], "opt_scalars": scalars, **log},
    )


def _load_checkpoint(where: Folder | Path, model: nn.Module, opt: torch.optim.Optimizer
                     ) -> tuple[int, dict, dict] | None:  # fmt: skip
    d = as_folder(where)
    if not d.exists("checkpoint.json"):
        return None
    info = d.read_json("checkpoint.json")
    state = tensors_from_bytes(d.read_bytes("checkpoint.safetensors"))
    model.load_trainable(to_torch({k[6:]: v for k, v in state.items() if k.startswith("model.")}))
    best = {k[5:]: v for k, v in state.items() if k.startswith("best.")}
    opt_state: dict[int, dict] = {int(pid): dict(s) for pid, s in info["opt_scalars"].items()}
    for k, v in state.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = torch.from_numpy(np.array(v))
    opt.load_state_dict({"state": opt_state, "param_groups": info["param_groups"]})
    return info["epoch"], best, info


def _batches(order: np.ndarray, size: int) -> list[np.ndarray]:
    return [order[s : s + size] for s in range(0, len(order), size)]


def evaluate(model: nn.Module, source: Source, n: int, batch_size: int, device: str) -> float:
    """Accuracy on the `n` items of `source`, counted on the device and read once."""
    if n == 0:
        return float("nan")
    model.eval()
    correct, seen = torch.zeros((), dtype=torch.int64, device=device), 0
    with torch.inference_mode(), _autocast(device):
        for x, y in source.iterate(_batches(np.arange(n), batch_size)):
            if len(y):
                correct += (model(x).argmax(1) == y).sum()
                seen += len(y)
    return correct.item() / max(seen, 1)


def _autocast(device: str):
    # bfloat16 autocast on a GPU (no loss scaling needed); full precision on the CPU.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def fit(
    model: nn.Module,
    train: Source,
    val: Source,
    n: int,
    n_val: int,
    hp: dict[str, Any],
    reporter: Reporter,
    checkpoint_dir: Folder | Path,
    device: str,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The training loop shared by every method and mode, over `n` training and `n_val` validation items of the
    sources; returns (best weights, metrics)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if hp["optimizer"] == "sgd":
        opt = torch.optim.SGD(params, lr=hp["lr"], momentum=0.9, weight_decay=hp["weight_decay"])
    else:
        opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
    bs = min(hp["batch_size"], n)
    steps_per_epoch = -(-n // bs)
    total = steps_per_epoch * hp["epochs"]
    warmup = max(1, round(hp["warmup_epochs"] * steps_per_epoch))
    if warmup > total // 2 and total > 1:
        # e.g. ARC's 10 warmup epochs (from 100-epoch runs) in a 10-epoch job would never reach the decay
        reporter.event(f"warmup of {hp['warmup_epochs']} epochs capped at half of this {hp['epochs']}-epoch run")
        warmup = max(1, total // 2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total))
    loss_fn = nn.CrossEntropyLoss()

    start_epoch, best_acc, best_epoch, seconds, seen = 0, -1.0, 0, 0.0, 0
    best = to_numpy(model.trainable_state())
    resumed = _load_checkpoint(checkpoint_dir, model, opt)
    if resumed:
        start_epoch, best, log = resumed
        best_acc, best_epoch, seconds, seen = log["best_acc"], log["best_epoch"], log["seconds"], log["seen"]
        sched.last_epoch = start_epoch * steps_per_epoch - 1
        sched.step()
        reporter.event(f"resumed training from the checkpoint of epoch {start_epoch}")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    forward = torch.compile(model) if hp.get("compile") else model  # shares the parameters: saved as `model`
    first_step_s: float | None = None
    for epoch in range(start_epoch, hp["epochs"]):
        model.train()
        order = np.random.default_rng(hp["seed"] * 100_003 + epoch).permutation(n)
        # the loss is summed on the device and read once per epoch: no step waits for the device to catch up
        t0, loss_sum, count = time.perf_counter(), torch.zeros((), device=device), 0
        for step, (x, y) in enumerate(train.iterate(_batches(order, bs))):
            if len(y):
                with _autocast(device):
                    loss = loss_fn(forward(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach().float() * len(y)
                count += len(y)
                if first_step_s is None:  # the one step that waits for the device: with compile, it compiles
                    loss.item()
                    first_step_s = time.perf_counter() - t0
            sched.step()
            if step % 20 == 0:
                reporter.check_cancel()
        train_loss = loss_sum.item() / max(count, 1)
        if not math.isfinite(train_loss):  # read once per epoch: a diverged run fails, and no NaN model is saved
            raise NonFiniteLoss(f"the training loss became {train_loss} in epoch {epoch + 1}; lower training.lr "
                                f"({hp['lr']}) or check the data")  # fmt: skip
        epoch_s = time.perf_counter() - t0
        seconds += epoch_s
        seen += count
        acc = evaluate(forward, val, n_val, max(bs, 64), device)
        if acc > best_acc:
            best_acc, best_epoch, best = acc, epoch + 1, to_numpy(model.trainable_state())
        metrics = {"epoch": epoch + 1, "train_loss": round(train_loss, 5), "val_accuracy": round(acc, 5),
                   "train_seconds": round(epoch_s, 3),
                   "lr": round(sched.get_last_lr()[0], 6)}  # fmt: skip
        reporter.event(f"epoch {epoch + 1}/{hp['epochs']}: loss {metrics['train_loss']:.4f}, "
                       f"val acc {acc:.4f}", type="metrics", data=metrics)  # fmt: skip
        reporter.progress("training", epoch + 1, hp["epochs"], **metrics)
        log = {"best_acc": best_acc, "best_epoch": best_epoch, "seconds": seconds, "seen": seen}
        _save_checkpoint(checkpoint_dir, epoch + 1, model, best, opt, log)
        reporter.check_cancel()
    metrics = {
        "val_accuracy": round(best_acc, 5),
        "best_epoch": best_epoch,
        "epochs": hp["epochs"],
        "train_images": int(n),
        "val_images": int(n_val),
        "trainable_params": sum(p.numel() for p in params),
        "side_params": model.side_parameters(),
        "train_seconds": round(seconds, 3),
        "train_images_per_s": round(seen / max(seconds, 1e-9), 1),
        "compiled": bool(hp.get("compile")),
    }
    if first_step_s is not None:
        metrics["first_step_seconds"] = round(first_step_s, 3)
    if device.startswith("cuda"):
        metrics["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return best, metrics


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


def _split(labels: np.ndarray, usable: np.ndarray, spec: JobSpec) -> tuple[np.ndarray, np.ndarray]:
    train_pos, val_pos = stratified_split(labels[usable], spec.dataset.val_fraction, spec.dataset.split_seed)
    return usable[train_pos], usable[val_pos]


def train_job(
    spec: JobSpec, settings: Settings, cache_key: str | None, reporter: Reporter, checkpoint_dir: Folder | Path
) -> dict[str, Any]:
    """Build the job's model and input sources for its execution mode, train; returns {"weights", "config",
    "metrics"} for the artifact store."""
    mode, kind, device = spec.mode, type(spec.method).kind, settings.torch_device()
    entry = backbone = dataset = None
    if spec.needs_cache:
        if not cache_key:
            raise RuntimeError(f"mode {mode!r} needs the feature cache, and the extraction step left none")
        entry = FeatureCache(settings.cache_location).entry(cache_key)
        meta = entry.meta
        labels, valid, classes = entry.labels(), entry.valid(), meta["classes"]
        if not valid.all() and spec.dataset.on_corrupt == "fail":
            bad = entry.summary.get("skipped", [])[:3]
            raise DatasetError(f"{int((~valid).sum())} images in the cache could not be decoded (e.g. {bad}); "
                               "set dataset.on_corrupt='skip' to train without them")  # fmt: skip
        usable = np.flatnonzero(valid)
    else:
        dataset = read_for_job(spec.dataset, settings.roots)
        check_inputs(spec.backbone.video, dataset.kind, spec.dataset.path)
        if dataset.skipped_rows:
            reporter.event(f"{len(dataset.skipped_rows)} dataset rows left out: {'; '.join(dataset.skipped_rows[:5])}",
                           level="warning")  # fmt: skip
        labels, classes, usable = dataset.labels, dataset.classes, np.arange(len(dataset))
    if mode != "cache":
        ckpt = check_path(spec.backbone.checkpoint, settings.roots) if spec.backbone.checkpoint else None
        # frozen in online mode (its forward's precision); trained through in images and tail modes (fp32 weights)
        backbone = load_backbone(spec.backbone, device, ckpt, precision=None if mode == "online" else "fp32")
        meta = backbone.info()
        if entry is not None and backbone.weights_hash != entry.meta["weights_hash"]:
            raise RuntimeError("the backbone's weights changed since the features were cached")
    train_idx, val_idx = _split(labels, usable, spec)
    hp = spec.training.resolved(spec.method.training_defaults())

    torch.manual_seed(hp["seed"])
    tokens = entry.meta["token_mode"] if entry is not None else "all"  # what the cache holds, else live tokens
    if kind == "side":
        readout = entry.readout() if mode == "cache" else backbone.readout_tensors()
        info = FeatureInfo.from_meta(meta, readout, len(classes), tokens)
        model = methods.build(spec.method, info)
    else:
        tail = spec.execution.tail_blocks if mode == "tail" else None
        model = methods.build(spec.method, backbone.model, len(classes), tail)
    model = model.to(device)

    if entry is not None:
        entry.touch()
        host, dev = memory_budgets(settings, device)
        layers = model.input_layers
        train_src = CacheSource(entry, train_idx, labels[train_idx], layers, host // 2, device, dev // 2)
        val_src = CacheSource(entry, val_idx, labels[val_idx], layers, host // 2, device, dev // 2)
        where = "cached features " + ("on the GPU" if train_src.on_device else "in memory" if train_src.in_memory
                                      else "streamed from the cache")  # fmt: skip
    else:
        skip = spec.dataset.on_corrupt == "skip"
        augment = SplitTransform.of(backbone.train_transform()) if spec.execution.augment else backbone.split
        workers = loader_workers(settings, len(train_idx))
        # inputs in the frozen forward's dtype online; fp32 for methods trained through the backbone (autocast)
        dtype = backbone.dtype if mode == "online" else torch.float32
        train_reader = val_reader = None
        if spec.backbone.video is not None:  # clips: jittered in time (and cropped, flipped with augment) to train
            video, dc, pil = spec.backbone.video, backbone.data_config, backbone.split.pil
            augment = backbone.split  # normalisation on the device, as for images; the clips' transform is below
            train_reader = epoch_reader(dataset, clip_transform(dc, pil, spec.execution.augment), skip, video, True)
            val_reader = epoch_reader(dataset, clip_transform(dc, pil), skip, video, False)
        train_src = ImageSource(dataset, train_idx, augment, skip, device, workers, dtype, train_reader)
        val_src = ImageSource(dataset, val_idx, backbone.split, skip, device, workers, dtype, val_reader)
        if mode == "online":
            train_src = OnlineSource(train_src, backbone, model.input_layers)
            val_src = OnlineSource(val_src, backbone, model.input_layers)
        inputs = "clips (jittered in time)" if spec.backbone.video is not None else "images"
        where = f"{inputs}{' (augmented)' if spec.execution.augment else ''}" + (
            ", backbone forward every step" if mode == "online" else ", through the backbone"
        )
    reporter.event(
        f"training {spec.method.name} in mode {mode} ({model.side_parameters():,} side parameters) on "
        f"{len(train_idx)} images, validating on {len(val_idx)}; inputs: {where}",
        data={"hyperparameters": hp},
    )
    weights, metrics = fit(model, train_src, val_src, len(train_idx), len(val_idx), hp, reporter, checkpoint_dir,
                           device)  # fmt: skip
    config = {
        "method": spec.method.model_dump(),
        "kind": kind,
        "mode": mode,
        "tail_blocks": spec.execution.tail_blocks if mode == "tail" else None,
        "backbone": spec.backbone.model_dump(),
        "weights_hash": meta["weights_hash"],
        "data_config": meta["data_config"],
        "feature_info": {
            **{k: meta[k] for k in FEATURE_KEYS},
            "temporal": meta.get("temporal"),
            "tokens": meta["tokens"] if tokens == "all" else 1,
            "num_classes": len(classes),
            "token_mode": tokens,
        },
        "input_layers": model.input_layers if kind == "side" else None,
        "input_tokens": tokens if kind == "side" else None,
        "classes": classes,
        "hyperparameters": hp,
        "cache_key": cache_key if entry is not None else None,
    }
    return {"weights": weights, "config": config, "metrics": metrics}
