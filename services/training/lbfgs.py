"""The linear probe's L-BFGS solver: the optimum of the convex problem, not a few epochs of SGD towards it.

The pooled features (the probe's frozen readout of the cached last layer) are computed in one pass over the cache
and standardised with the mean and standard deviation of the rows being fitted. For each L2 strength `l2` of a
grid, from the strongest to the weakest (each start warm from the previous solution), full-batch L-BFGS with a
strong Wolfe line search minimises

    mean loss(W x + b) + l2 / 2 * ||W||^2        (the bias is not penalised)

where the loss is the job's objective (cross-entropy, or per-tag binary cross-entropy; label smoothing and class
weights as configured). That is scikit-learn's LogisticRegression with C = 1 / (l2 * n_train), solved to the same
criterion: the largest gradient entry below `GRADIENT_TOLERANCE` (scikit-learn's `tol`, which its lbfgs solver
passes to scipy as `gtol`, on the same mean-loss scale). Along the weak end of the path a warm start often meets the
criterion at once, so those strengths cost next to nothing.

On the CPU a problem below `ONE_THREAD_MAX` is solved on one thread (`threads_for`): its many small ops gain
nothing from a second, and where other processes keep the cores busy, OpenMP's threads wait for each other at every
op. Measured at load 5 on 2 cores (the cross-validated path: 17 strengths, 5 folds): 100 x 384 x 10
classes 14.3 s on two threads, 0.7 s on one; 2,000 x 768 x 100, 75 s and 14 s.

A path is scored on held-out rows (`solve_path`): by k-fold cross-validation (`cross_validate`, a path per fold,
each standardised by its own training rows) or on the validation split. The strength with the best held-out figure
wins (ties: the lower held-out loss), and `refit` solves it once more on every labelled row (services/training/
probes.py runs the protocol).

The standardisation is folded into the saved classifier, W' = W / sigma and b' = b - W' mu, so predict and export
see an ordinary Linear.

Full batch need not mean one [n, C] block of logits (21,843 classes x 21,843 images: 1.9 GB, and as much again for
its gradient): where n x C is large the loss and its gradient are summed over chunks of rows
(evaluation.row_chunks), each chunk's share weighted as the objective weighs it, so memory stays at one chunk
whatever the class count; a single chunk computes exactly what it always did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import KFold, StratifiedKFold

from services.training.evaluation import row_chunks, validation_score
from services.training.objectives import Objective

# L2 strengths tried when training.weight_decay is `auto`: 10^1 .. 10^-7 in half decades, strongest first (C from
# about 1e-4 to 1e4 at a thousand training images).
L2_GRID = tuple(float(f"{10**e:.3g}") for e in np.arange(1.0, -7.01, -0.5))
GRADIENT_TOLERANCE = 1e-4
ONE_THREAD_MAX = 2e8  # rows x features x classes: a logits matmul of at most this many multiply-adds


@contextmanager
def threads_for(x: torch.Tensor, num_classes: int) -> Iterator[None]:
    """Torch on one thread meanwhile, for a problem on the CPU below `ONE_THREAD_MAX` (the module says why)."""
    if x.device.type != "cpu" or x.shape[0] * x.shape[1] * num_classes > ONE_THREAD_MAX:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class PathPoint:
    l2: float
    score: float  # validation accuracy, or mAP (multi-label)
    loss: float  # plain validation loss
    iterations: int
    # the classifier, standardisation folded in: [C, D] and [C]; None for every point but the path's best
    weight: np.ndarray | None = field(default=None, repr=False)
    bias: np.ndarray | None = field(default=None, repr=False)


def standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation per feature (a constant feature gets 1, so it stays 0 after centring)."""
    mu = x.mean(0)
    sigma = x.std(0, unbiased=False)
    return mu, torch.where(sigma > 1e-6 * sigma.max().clamp(min=1e-12), sigma, torch.ones_like(sigma))


def _augment(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Standardised features with a column of ones (the last column of the parameter is the bias)."""
    return torch.cat([(x - mu) / sigma, x.new_ones(len(x), 1)], dim=1)


def _path(
    xs: torch.Tensor, y_train: torch.Tensor, grid: list[float] | tuple[float, ...], objective: Objective, max_iter: int
) -> Iterator[tuple[float, torch.Tensor, int]]:
    """(l2, parameter [C, D + 1], iterations) for each strength of `grid`, strongest first, each solve warm-started
    from the previous one. The parameter is the live tensor: read it before asking for the next strength."""
    w = torch.zeros(objective.num_classes, xs.shape[1], device=xs.device, requires_grad=True)
    parts = row_chunks(len(xs), objective.num_classes)
    total = objective.normalizer(y_train)
    shares = [objective.normalizer(y_train[rows]) / total for rows in parts] if len(parts) > 1 else []
    for l2 in sorted(set(grid), reverse=True):
        opt = torch.optim.LBFGS(
            [w],
            lr=1.0,
            max_iter=max_iter,
            history_size=10,
            tolerance_grad=GRADIENT_TOLERANCE,
            tolerance_change=1e-12,
            line_search_fn="strong_wolfe",
        )

        def closure(l2: float = l2, opt: torch.optim.LBFGS = opt) -> torch.Tensor:
            opt.zero_grad()
            if not shares:
                loss = objective.single(xs @ w.t(), y_train) + l2 / 2 * w[:, :-1].pow(2).sum()
                loss.backward()
                return loss
            loss = l2 / 2 * w[:, :-1].pow(2).sum()
            loss.backward()  # each part's gradient adds to w.grad, and its graph is freed before the next part
            loss = loss.detach()
            for rows, share in zip(parts, shares, strict=True):
                part = objective.single(xs[rows] @ w.t(), y_train[rows]) * share
                part.backward()
                loss = loss + part.detach()
            return loss

        opt.step(closure)
        yield l2, w, int(opt.state_dict()["state"][0]["n_iter"])


def _fold(w: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The classifier on raw features: the standardisation folded into W and b."""
    with torch.no_grad():
        folded = w[:, :-1] / sigma
        return folded.cpu().numpy(), (w[:, -1] - folded @ mu).cpu().numpy()


def solve_path(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: np.ndarray,
    grid: list[float] | tuple[float, ...],
    objective: Objective,
    max_iter: int,
    on_point: Callable[[PathPoint], None] | None = None,
    keep: bool = True,
) -> list[PathPoint]:
    """One PathPoint per strength of `grid`, strongest first, scored on the validation features. Features: float32
    [n, D] on the device. Only the best point (`best`) keeps its classifier (none with `keep` False): a path of 17
    strengths over 21,843 classes would hold 17 of them."""
    mu, sigma = standardise(x_train)
    xs, xv = _augment(x_train, mu, sigma), _augment(x_val, mu, sigma)
    y_val_t = objective.targets(y_val)
    points: list[PathPoint] = []
    kept = 0  # the best point so far, the one that keeps its weights
    for l2, w, iterations in _path(xs, y_train, grid, objective, max_iter):
        with torch.no_grad():
            score, loss = _validation(xv, w, y_val, y_val_t, objective)
        point = PathPoint(l2=l2, score=score, loss=loss, iterations=iterations)
        if keep and (not points or rank(point, len(points)) > rank(points[kept], kept)):
            if points:
                points[kept].weight = points[kept].bias = None
            kept = len(points)
            point.weight, point.bias = _fold(w, mu, sigma)
        points.append(point)
        if on_point is not None:
            on_point(point)
    return points


def folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """The held-out rows of each of `k` folds: stratified by class for single-label `labels` (scikit-learn's
    StratifiedKFold, shuffled with `seed`), plain shuffled folds for multi-label targets [n, C]."""
    rows = np.zeros(len(labels))
    splitter = (
        StratifiedKFold(k, shuffle=True, random_state=seed)
        if labels.ndim == 1
        else KFold(k, shuffle=True, random_state=seed)
    )
    return [held for _, held in splitter.split(rows, labels if labels.ndim == 1 else None)]


@dataclass
class CvPoint:
    """One L2 strength scored by k-fold cross-validation: the mean and spread of its held-out figures."""

    l2: float
    score: float
    std: float
    loss: float
    iterations: int  # summed over the folds
    fold_scores: list[float]


def cross_validate(
    x: torch.Tensor,
    y: torch.Tensor,
    labels: np.ndarray,
    held_out: list[np.ndarray],
    grid: list[float] | tuple[float, ...],
    objective: Objective,
    max_iter: int,
    between: Callable[[], None] | None = None,
) -> list[CvPoint]:
    """Every strength of `grid` (strongest first) scored by cross-validation: for each fold, a path solved on the
    other folds (standardised by their own statistics) and scored on the fold. `x` [n, D] features, `y` the
    objective's targets of the same rows, `labels` their labels, `held_out` the folds' rows. A fold's NaN score (a
    diverged solve) makes the strength's mean NaN, so it is never chosen. `between` runs after each fold (a
    cancellation check)."""
    per_l2: dict[float, list[tuple[float, float, int]]] = {}
    everything = np.arange(len(x))
    for held in held_out:
        fit_rows = torch.from_numpy(np.setdiff1d(everything, held)).to(x.device)
        held_t = torch.from_numpy(held).to(x.device)
        path = solve_path(x[fit_rows], y[fit_rows], x[held_t], labels[held], grid, objective, max_iter, keep=False)
        for point in path:
            per_l2.setdefault(point.l2, []).append((point.score, point.loss, point.iterations))
        if between is not None:
            between()
    out = []
    for l2 in sorted(per_l2, reverse=True):
        scores = [s for s, _, _ in per_l2[l2]]
        out.append(
            CvPoint(
                l2=l2,
                score=float(np.mean(scores)),
                std=float(np.std(scores)),
                loss=float(np.mean([loss for _, loss, _ in per_l2[l2]])),
                iterations=sum(i for _, _, i in per_l2[l2]),
                fold_scores=scores,
            )
        )
    return out


def refit(
    x: torch.Tensor,
    y: torch.Tensor,
    path: list[float],
    objective: Objective,
    max_iter: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The classifier solved on all of `x` at the chosen strength, the last (weakest) of `path` (the protocol's final
    fit, as scikit-learn's GridSearchCV(refit=True) makes it), reached along the same warm-started path that scored
    it: at weak strengths the problem is nearly flat and a cold start ends elsewhere than the path did (on held-out
    digits at 112 px, 2 points of test accuracy). Returns (weight [C, D], bias [C], iterations summed over the path),
    standardisation folded in."""
    mu, sigma = standardise(x)
    iterations, solved = 0, None
    for _, w, n in _path(_augment(x, mu, sigma), y, path, objective, max_iter):
        iterations, solved = iterations + n, w
    return (*_fold(solved, mu, sigma), iterations)


def choose(points: list[PathPoint] | list[CvPoint]) -> int:
    """Index of the strength that the protocol keeps: the best held-out figure, and among equal figures the strongest
    (as GridSearchCV, given C ascending, takes the first best). Not the lower held-out loss: along the weak end of a
    path the scores tie and the losses differ in the fourth decimal, which would pick the weakest strength by noise.
    A NaN figure never wins."""
    return max(range(len(points)), key=lambda i: (_finite(points[i].score), points[i].l2, -i))


def _finite(score: float) -> float:
    return score if score == score else -math.inf


def _validation(
    xv: torch.Tensor, w: torch.Tensor, y_val: np.ndarray, y_val_t: torch.Tensor, objective: Objective
) -> tuple[float, float]:
    """(validation figure, plain validation loss) of the weights `w` on the standardised validation features. A
    single-label split of many classes is scored chunk by chunk (accuracy and the loss summed over the chunks);
    mAP ranks every image's scores per tag, so a multi-label split is scored whole (its targets are [n, C] too)."""
    parts = row_chunks(len(xv), objective.num_classes)
    if objective.multi_label or len(parts) == 1:
        logits = xv @ w.t()
        return validation_score(y_val, logits.cpu().numpy()), float(objective.plain(logits[None], y_val_t)[0])
    right = torch.zeros((), dtype=torch.int64, device=w.device)
    loss = torch.zeros((), device=w.device)
    finite = torch.ones((), dtype=torch.bool, device=w.device)
    for rows in parts:
        logits = xv[rows] @ w.t()
        right += (logits.argmax(1) == y_val_t[rows]).sum()
        loss += objective.plain(logits[None], y_val_t[rows])[0] * len(logits)
        finite &= torch.isfinite(logits).all()
    score = int(right) / len(xv) if bool(finite) else float("nan")  # as validation_score: non-finite scores NaN
    return score, float(loss) / len(xv)


def rank(point: PathPoint, i: int) -> tuple[float, float, int]:
    """Higher is better: the validation figure, then the lower validation loss, then the earlier point; NaN ranks
    last (fit.select's order, which picks among the points of every path)."""
    loss = point.loss
    return (_finite(point.score), -(loss if loss == loss else math.inf), -i)


def best(points: list[PathPoint]) -> int:
    """Index of the best point: the one that kept its weights."""
    return max(range(len(points)), key=lambda i: rank(points[i], i))
