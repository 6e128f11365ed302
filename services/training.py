"""Training a cache-fed method (linear probe, LoSA): mini-batches of cached activations, SGD or AdamW with
linear warmup and cosine decay, validation accuracy every epoch, the best weights kept.

A checkpoint (current and best weights, optimizer state, epoch) is written after every epoch, so a
killed train worker resumes from the last finished epoch.
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
from services.datasets import DatasetError, stratified_split
from services.methods.readout import FeatureInfo
from services.progress import Reporter
from services.spec import JobSpec
from storage.artifacts import read_json, read_tensors, write_json, write_tensors
from storage.cache import CacheEntry


def to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def to_torch(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Features:
    """Cached activations of some samples: held in memory when they fit the budget, else read per batch."""

    def __init__(self, entry: CacheEntry, indices: np.ndarray, layers: list[int], budget_bytes: int) -> None:
        self.entry, self.indices, self.layers = entry, indices, layers
        n, _, t, d = entry.meta["shape"]
        self.in_memory = len(indices) * len(layers) * t * d * 2 <= budget_bytes
        self.data = torch.from_numpy(entry.read(indices, layers)) if self.in_memory else None

    def batch(self, positions: np.ndarray) -> torch.Tensor:
        if self.data is not None:
            return self.data[torch.from_numpy(positions)]
        return torch.from_numpy(self.entry.read(self.indices[positions], self.layers))


def _save_checkpoint(d: Path, epoch: int, model: nn.Module, best: dict, opt: torch.optim.Optimizer, log: dict):
    state = {f"model.{k}": v for k, v in to_numpy(model.state_dict()).items()}
    state |= {f"best.{k}": v for k, v in best.items()}
    opt_state = opt.state_dict()
    for pid, s in opt_state["state"].items():
        for name, value in s.items():
            if torch.is_tensor(value):
                state[f"opt.{pid}.{name}"] = value.detach().cpu().numpy().reshape(value.shape)
    write_tensors(d / "checkpoint.safetensors", state)
    scalars = {pid: {k: v for k, v in s.items() if not torch.is_tensor(v)} for pid, s in opt_state["state"].items()}
    write_json(
        d / "checkpoint.json",
        {"epoch": epoch, "param_groups": opt_state["param_groups"], "opt_scalars": scalars, **log},
    )


def _load_checkpoint(d: Path, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, dict, dict] | None:
    if not (d / "checkpoint.json").exists():
        return None
    info = read_json(d / "checkpoint.json")
    state = read_tensors(d / "checkpoint.safetensors")
    model.load_state_dict(to_torch({k[6:]: v for k, v in state.items() if k.startswith("model.")}))
    best = {k[5:]: v for k, v in state.items() if k.startswith("best.")}
    opt_state: dict[int, dict] = {int(pid): dict(s) for pid, s in info["opt_scalars"].items()}
    for k, v in state.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = torch.from_numpy(np.array(v))
    opt.load_state_dict({"state": opt_state, "param_groups": info["param_groups"]})
    return info["epoch"], best, info


def evaluate(model: nn.Module, feats: Features, labels: np.ndarray, batch_size: int, device: str) -> float:
    if len(labels) == 0:
        return float("nan")
    model.eval()
    correct = 0
    with torch.inference_mode():
        for s in range(0, len(labels), batch_size):
            pos = np.arange(s, min(s + batch_size, len(labels)))
            logits = model(feats.batch(pos).to(device))
            correct += int((logits.argmax(1).cpu().numpy() == labels[pos]).sum())
    return correct / len(labels)


def train_from_cache(
    entry: CacheEntry, spec: JobSpec, reporter: Reporter, checkpoint_dir: Path, device: str, budget_mb: int
) -> dict[str, Any]:
    """Returns {"weights", "config", "metrics"} for the artifact store."""
    meta = entry.meta
    labels_all, valid = entry.labels(), entry.valid()
    if not valid.all() and spec.dataset.on_corrupt == "fail":
        bad = entry.summary.get("skipped", [])[:3]
        raise DatasetError(f"{int((~valid).sum())} images in the cache could not be decoded (e.g. {bad}); "
                           "set dataset.on_corrupt='skip' to train without them")  # fmt: skip
    usable = np.flatnonzero(valid)
    train_pos, val_pos = stratified_split(labels_all[usable], spec.dataset.val_fraction, spec.dataset.split_seed)
    train_idx, val_idx = usable[train_pos], usable[val_pos]
    classes = meta["classes"]
    info = FeatureInfo.from_meta(meta, entry.readout(), len(classes))
    hp = spec.training.resolved(spec.method.training_defaults())

    torch.manual_seed(hp["seed"])
    model = methods.build(spec.method, info).to(device)
    layers = model.input_layers
    budget = budget_mb * 2**20
    train_feats = Features(entry, train_idx, layers, budget // 2)
    val_feats = Features(entry, val_idx, layers, budget // 2)
    y_train, y_val = labels_all[train_idx], labels_all[val_idx]

    params = [p for p in model.parameters() if p.requires_grad]
    if hp["optimizer"] == "sgd":
        opt = torch.optim.SGD(params, lr=hp["lr"], momentum=0.9, weight_decay=hp["weight_decay"])
    else:
        opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
    bs = min(hp["batch_size"], len(train_idx))
    steps_per_epoch = -(-len(train_idx) // bs)
    total = steps_per_epoch * hp["epochs"]
    warmup = min(total, max(1, round(hp["warmup_epochs"] * steps_per_epoch)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total))
    loss_fn = nn.CrossEntropyLoss()

    start_epoch, best, best_acc, best_epoch, seconds, seen = 0, to_numpy(model.state_dict()), -1.0, 0, 0.0, 0
    resumed = _load_checkpoint(checkpoint_dir, model, opt)
    if resumed:
        start_epoch, best, log = resumed
        best_acc, best_epoch, seconds, seen = log["best_acc"], log["best_epoch"], log["seconds"], log["seen"]
        sched.last_epoch = start_epoch * steps_per_epoch - 1
        sched.step()
        reporter.event(f"resumed training from the checkpoint of epoch {start_epoch}")
    reporter.event(
        f"training {spec.method.name} ({model.side_parameters():,} side parameters) on {len(train_idx)} images, "
        f"validating on {len(val_idx)}; features {'in memory' if train_feats.in_memory else 'streamed'}",
        data={"hyperparameters": hp},
    )
    for epoch in range(start_epoch, hp["epochs"]):
        model.train()
        rng = np.random.default_rng(hp["seed"] * 100_003 + epoch)
        order = rng.permutation(len(train_idx))
        t0, loss_sum = time.perf_counter(), 0.0
        for step in range(steps_per_epoch):
            pos = order[step * bs : (step + 1) * bs]
            x = train_feats.batch(pos).to(device)
            y = torch.from_numpy(y_train[pos]).to(device)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(pos)
            if step % 20 == 0:
                reporter.check_cancel()
        seconds += time.perf_counter() - t0
        seen += len(train_idx)
        acc = evaluate(model, val_feats, y_val, 256, device)
        if acc > best_acc:
            best_acc, best_epoch, best = acc, epoch + 1, to_numpy(model.state_dict())
        metrics = {"epoch": epoch + 1, "train_loss": round(loss_sum / len(train_idx), 5), "val_accuracy": round(acc, 5),
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
        "train_images": int(len(train_idx)),
        "val_images": int(len(val_idx)),
        "trainable_params": model.side_parameters() + sum(p.numel() for p in model.head.parameters()),
        "side_params": model.side_parameters(),
        "train_seconds": round(seconds, 3),
        "train_images_per_s": round(seen / max(seconds, 1e-9), 1),
    }
    config = {
        "method": spec.method.model_dump(),
        "backbone": spec.backbone.model_dump(),
        "weights_hash": meta["weights_hash"],
        "data_config": meta["data_config"],
        "feature_info": {k: v for k, v in info.__dict__.items() if k != "readout"},
        "input_layers": layers,
        "classes": classes,
        "hyperparameters": hp,
        "cache_key": entry.path.name,
    }
    return {"weights": best, "config": config, "metrics": metrics}
