"""The training loop shared by every method, execution mode and sweep (`fit`): mini-batches from a source, each read
once for every configuration; SGD or AdamW with linear warmup and cosine decay; validation every epoch with the
best weights kept per configuration; a checkpoint after every epoch (current and best trainable weights, optimizer
state, epoch, curves), so a killed train worker resumes from the last finished epoch. Frozen backbone weights are
never checkpointed. services/training/job.py prepares what it trains (`train_job`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.data.datasets import DatasetError
from services.data.sources import Source
from services.errors import UserError
from services.jobs.progress import Reporter
from services.spec import Hyperparameters
from services.training import checkpoint, halving
from services.training.evaluation import top_k_hits, validation_scores
from services.training.metrics import Timing
from services.training.objectives import Objective
from services.training.runs import Runs
from services.training.state import LoopState, Result, row
from services.training.tracking import Tracker
from storage.store import Folder


class NonFiniteLoss(UserError):
    """The training loss went NaN or infinite: the job fails and registers no model."""

    code = "non_finite_loss"


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batches_of(order: np.ndarray, size: int) -> list[np.ndarray]:
    return [order[s : s + size] for s in range(0, len(order), size)]


def select(results: list[Result]) -> int:
    """The configuration with the best validation figure; ties: the lower validation loss, then the first. A NaN
    figure ranks last (halving.ranking, which early termination ranks by too)."""
    return max(range(len(results)), key=lambda j: halving.ranking(results[j].score, results[j].loss, j))


def inputs_for(x: torch.Tensor, runs: Runs, layers: list[int] | None) -> torch.Tensor:
    """The batch as `runs` reads it: its own cached layers out of the union that was read."""
    if layers is None or runs.input_layers is None or runs.input_layers == layers:
        return x
    return x[:, [layers.index(layer) for layer in runs.input_layers]]


def _each_batch(
    runs: list[Runs],
    source: Source,
    n: int,
    batch_size: int,
    layers: list[int] | None,
    each: Callable[[list[torch.Tensor], torch.Tensor], None],
) -> None:
    """`each(logits, labels)` for every batch of the first `n` items of `source` (in order) that holds an image:
    logits [K, B, C] of every Runs, on the device, computed in inference mode."""
    for r in runs:
        r.train(False)
    with torch.inference_mode():
        for x, y in source.iterate(batches_of(np.arange(n), batch_size)):
            if len(y):
                each([r.logits(inputs_for(x, r, layers)) for r in runs], y)


def predict(
    runs: list[Runs], source: Source, n: int, batch_size: int, layers: list[int] | None, device: str
) -> tuple[list[np.ndarray], np.ndarray]:
    """Logits [n', C] (float32, on the host) of every configuration, each batch read once, and the labels of their
    rows (all n, unless images that cannot be decoded are skipped). One read of the device, at the end. Holds n x C
    scores per configuration: single-label scoring goes through `evaluate` and `predicted_labels` instead."""
    out: list[list[torch.Tensor]] = [[] for _ in runs]  # per Runs: [K, B, C] per batch
    labels: list[torch.Tensor] = []

    def keep(logits: list[torch.Tensor], y: torch.Tensor) -> None:
        labels.append(y)
        for parts, part in zip(out, logits, strict=True):
            parts.append(part)

    _each_batch(runs, source, n, batch_size, layers, keep)
    if not labels:
        return [np.empty((0, 0), np.float32) for r in runs for _ in range(r.count)], np.empty(0, np.int64)
    stacked = [torch.cat(parts, dim=1).cpu().numpy() for parts in out]
    return [logits for s in stacked for logits in s], torch.cat(labels).cpu().numpy()


def predicted_labels(
    runs: list[Runs], source: Source, n: int, batch_size: int, layers: list[int] | None, objective: Objective
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One single-label model's (`runs`: one configuration) evaluation inputs, batch by batch so that the
    probabilities [n, C] are never held whole: every row's label, predicted class (the most probable) and whether
    its label is among the 5 most probable classes (None for 5 classes or fewer), as evaluation.report computes
    them from the probabilities."""
    labels: list[np.ndarray] = []
    predicted: list[np.ndarray] = []
    hits: list[np.ndarray] = []
    top5 = objective.num_classes > 5

    def score(logits: list[torch.Tensor], y: torch.Tensor) -> None:
        probs = objective.probabilities(logits[0][0].float().cpu().numpy())
        labels.append(y.cpu().numpy())
        predicted.append(probs.argmax(1))
        if top5:
            hits.append(top_k_hits(labels[-1], probs, 5))

    _each_batch(runs, source, n, batch_size, layers, score)
    if not labels:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, bool) if top5 else None
    return np.concatenate(labels), np.concatenate(predicted), np.concatenate(hits) if top5 else None


def evaluate(
    runs: list[Runs], source: Source, n: int, batch_size: int, layers: list[int] | None, objective: Objective
) -> list[tuple[float, float]]:
    """(validation figure, plain validation loss) of every configuration. Single-label: accuracy and loss summed
    batch by batch on the device (never n x C scores on the host; one read of the device, at the end); a
    configuration with a non-finite score scores NaN, as validation_scores says. Multi-label: mAP ranks each tag's
    scores over the whole split, so they are kept (the targets are [n, tags] too)."""
    if n == 0:
        raise DatasetError("the validation split is empty")  # refused at submission; the cache lost images since
    if objective.multi_label:
        all_logits, targets = predict(runs, source, n, batch_size, layers, objective.device)
        y = objective.targets(targets)
        # every configuration at once: a sweep of 32 linear heads evaluates in an epoch of a few milliseconds
        losses = objective.plain(torch.from_numpy(np.stack(all_logits)).to(y.device), y).tolist()
        return list(zip(validation_scores(targets, all_logits), losses, strict=True))
    count = sum(r.count for r in runs)
    right = torch.zeros(count, dtype=torch.int64, device=objective.device)
    loss = torch.zeros(count, device=objective.device)
    finite = torch.ones(count, dtype=torch.bool, device=objective.device)
    rows = 0

    def add(logits: list[torch.Tensor], y: torch.Tensor) -> None:
        nonlocal rows
        z = torch.cat(logits).float()  # [K, B, C]
        y = y.to(z.device)
        right.add_((z.argmax(2) == y).sum(1))
        loss.add_(objective.plain(z, y) * len(y))
        finite.logical_and_(torch.isfinite(z).all(2).all(1))
        rows += len(y)

    _each_batch(runs, source, n, batch_size, layers, add)
    if not rows:
        return [(float("nan"), float("nan"))] * count
    scores = [r / rows if ok else float("nan") for r, ok in zip(right.tolist(), finite.tolist(), strict=True)]
    return list(zip(scores, (loss / rows).tolist(), strict=True))


@dataclass(frozen=True)
class Schedule:
    """Linear warmup then cosine decay over a run's steps (`warmup_cosine`), as factors of each peak lr."""

    batch_size: int
    steps_per_epoch: int
    total: int
    warmup: int

    @classmethod
    def of(cls, hp: Hyperparameters, n: int, reporter: Reporter) -> Schedule:
        bs = min(hp.batch_size, n)
        steps_per_epoch = -(-n // bs)
        total = steps_per_epoch * hp.epochs
        warmup = max(1, round(hp.warmup_epochs * steps_per_epoch))
        if warmup > total // 2 and total > 1:
            # e.g. ARC's 10 warmup epochs (from 100-epoch runs) in a 10-epoch job would never reach the decay
            reporter.event(f"warmup of {hp.warmup_epochs} epochs capped at half of this {hp.epochs}-epoch run")
            warmup = max(1, total // 2)
        return cls(bs, steps_per_epoch, total, warmup)

    def scale(self, epoch: int, step: int) -> float:
        return warmup_cosine(epoch * self.steps_per_epoch + step, self.warmup, self.total)

    def last_of(self, epoch: int) -> float:
        """The factor of the epoch's last step (what its curve reports as the lr)."""
        return warmup_cosine(min((epoch + 1) * self.steps_per_epoch, self.total) - 1, self.warmup, self.total)


def fit(
    runs: list[Runs],
    where: list[tuple[int, int]],
    train: Source,
    val: Source,
    n: int,
    n_val: int,
    hp: Hyperparameters,
    objective: Objective,
    reporter: Reporter,
    checkpoint_dir: Folder | Path,
    layers: list[int] | None = None,
    tracker: Tracker | None = None,
) -> tuple[list[Result], Timing]:
    """The training loop shared by every method, mode and sweep, over `n` training and `n_val` validation items of
    the sources: configuration j is `where[j]` = (runs, index in it); every batch is read once for all of them.
    `layers`: the cached layers the sources read (each Runs takes its own); `tracker`: the job's trackers (TensorBoard,
    MLflow: tracking.py), fed the curves' rows as they are recorded. Returns each configuration's Result and the
    timings. The loop never waits for the device: losses are summed on it and read once per epoch. With
    `hp.early_termination` and several configurations, the lower half stops at each rung
    (services/training/halving.py): its Result keeps its figures and curve and no weights."""
    schedule = Schedule.of(hp, n, reporter)
    fields = ["epoch", "train_loss", objective.metric, "val_loss", "lr", "train_seconds"]  # a curve's columns
    state = LoopState.start(runs, where, fields, hp.epochs)
    at = halving.rungs(hp.epochs) if hp.early_termination and len(where) > 1 else []
    if checkpoint.resume(checkpoint_dir, state):
        reporter.event(f"resumed training from the checkpoint of epoch {state.epoch}")
    tracker = tracker or Tracker(reporter)
    tracker.record(state)  # after a resume, the epochs its checkpoint kept
    if objective.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(objective.device)
    with checkpoint.Writer() as writer:
        while state.epoch < hp.epochs:
            epoch = state.epoch
            train_loss, epoch_s = _train_epoch(state, train, n, schedule, hp.seed, objective, layers, reporter)
            diverged = _diverged(state, train_loss, reporter)
            scores = evaluate(state.runs, val, n_val, max(schedule.batch_size, 64), layers, objective)
            _record(state, scores, train_loss, diverged, schedule.last_of(epoch), epoch_s)
            if epoch + 1 in at:
                _halve(state, epoch + 1, reporter)
            state.epoch = epoch + 1
            _report_epoch(state, hp.epochs, objective.metric, reporter)
            tracker.record(state)
            checkpoint.save(writer, checkpoint_dir, state)
            reporter.check_cancel()
    return state.finish(hp.epochs), _timing(state, hp, at, objective.device)


def _train_epoch(
    state: LoopState,
    train: Source,
    n: int,
    schedule: Schedule,
    seed: int,
    objective: Objective,
    layers: list[int] | None,
    reporter: Reporter,
) -> tuple[list[float], float]:
    """One pass over the training items in the epoch's seeded order, every Runs stepping on each batch; each
    configuration's mean training loss (the epoch's one read of the device) and the epoch's seconds."""
    epoch, runs = state.epoch, state.runs
    for r in runs:
        r.train(True)
    order = np.random.default_rng(seed * 100_003 + epoch).permutation(n)
    t0, count = time.perf_counter(), 0
    loss_sums = [torch.zeros(r.count, device=objective.device) for r in runs]
    for step, (x, y) in enumerate(train.iterate(batches_of(order, schedule.batch_size))):
        if len(y):
            y = objective.cast(y)
            scale = schedule.scale(epoch, step)
            for r, sums in zip(runs, loss_sums, strict=True):
                sums += r.step(inputs_for(x, r, layers), y, scale) * len(y)
            count += len(y)
            if state.first_step_s is None:  # the one step that waits for the device: with compile, it compiles
                loss_sums[0].sum().item()
                state.first_step_s = time.perf_counter() - t0
        if step % 20 == 0:
            reporter.check_cancel()
    train_loss = (torch.cat(loss_sums) / max(count, 1)).tolist()
    epoch_s = time.perf_counter() - t0
    state.seconds += epoch_s
    state.seen += count
    return train_loss, epoch_s


def _diverged(state: LoopState, train_loss: list[float], reporter: Reporter) -> set[int]:
    """The rows whose training loss is not finite. All of them: the job fails, and no NaN model is saved; some (a
    sweep): the others go on, and a diverged configuration keeps its best finite epoch."""
    diverged = {pos for pos, value in enumerate(train_loss) if not math.isfinite(value)}
    if len(diverged) == len(train_loss):
        raise NonFiniteLoss(
            f"the training loss became {train_loss[0]} in epoch {state.epoch + 1}; lower training.lr or check the data"
        )
    flat = state.flat
    new = {flat[pos] for pos in diverged} - state.warned
    if new:
        reporter.event(
            f"{len(new)} of {len(train_loss)} configurations diverged (non-finite loss) in epoch {state.epoch + 1}",
            level="warning",
        )
        state.warned |= new
    return diverged


def _record(
    state: LoopState,
    scores: list[tuple[float, float]],
    train_loss: list[float],
    diverged: set[int],
    lr_scale: float,
    epoch_s: float,
) -> None:
    """The epoch's row of every configuration's curve; the best figures and weights of those that improved."""
    epoch = state.epoch
    improved: dict[int, list[int]] = {}
    for pos, j in enumerate(state.flat):
        res, (score, loss), (i, k) = state.results[j], scores[pos], state.where[j]
        state.curves[j, epoch] = [
            epoch + 1,
            round(train_loss[pos], 5),
            round(score, 5),
            round(loss, 5),
            float(f"{state.runs[i].base_lrs[k] * lr_scale:.4g}"),
            round(epoch_s, 3),
        ]
        if score > res.score and pos not in diverged:  # NaN (diverged weights) is never greater
            res.score, res.loss, res.epoch = score, loss, epoch + 1
            improved.setdefault(i, []).append(k)
    state.keep_best(improved)


def _halve(state: LoopState, epoch: int, reporter: Reporter) -> None:
    """Early termination after `epoch`: the lower half of the configurations still training stop."""
    stop = halving.losers({j: (state.results[j].score, state.results[j].loss) for j in state.flat})
    state.stop(set(stop), epoch)
    going = len(state.flat)
    reporter.event(
        f"early termination after epoch {epoch}: {len(stop)} of {len(stop) + going} configurations stopped (the "
        f"lower half on validation), {going} go on"
    )


def _report_epoch(state: LoopState, epochs: int, metric: str, reporter: Reporter) -> None:
    """The finished epoch's metrics event (the best configuration's row, and every row of a sweep) and progress."""
    epoch, results, fields = state.epoch - 1, state.results, state.fields
    rows = [
        row(fields, state.curves[j, epoch])
        for j in range(len(results))
        if j not in state.stopped or state.stopped[j] > epoch
    ]
    flat = state.flat
    last = row(fields, state.curves[flat[select([results[j] for j in flat])], epoch])
    label = f"best of {len(results)} configurations: " if len(results) > 1 else ""
    reporter.event(
        f"epoch {epoch + 1}/{epochs}: {label}loss {last['train_loss']:.4f}, "
        f"{metric.replace('_', ' ')} {last[metric]:.4f}",
        type="metrics",
        data=last if len(results) == 1 else {**last, "configurations": rows},
    )
    reporter.progress("training", epoch + 1, epochs, **last)


def _timing(state: LoopState, hp: Hyperparameters, at: list[int], device: str) -> Timing:
    timing: Timing = {
        "train_seconds": round(state.seconds, 3),
        "train_images_per_s": round(state.seen / max(state.seconds, 1e-9), 1),
        "compiled": hp.compile,
    }
    if at:
        timing["early_termination"] = halving.report(state.stopped, len(state.where), hp.epochs, at)
    if state.first_step_s is not None:
        timing["first_step_seconds"] = round(state.first_step_s, 3)
    if device.startswith("cuda"):
        timing["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return timing
