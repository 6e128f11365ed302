"""The linear probe's L-BFGS solver: the optimum of the convex problem, not a few epochs of SGD towards it.

The pooled features (the probe's frozen readout of the cached last layer) are computed in one pass over the cache
and standardised with the training split's mean and standard deviation. For each L2 strength `l2` of a grid, from
the strongest to the weakest (each start warm from the previous solution), full-batch L-BFGS with a strong Wolfe
line search minimises

    mean loss(W x + b) + l2 / 2 * ||W||^2        (the bias is not penalised)

where the loss is the job's objective (cross-entropy, or per-tag binary cross-entropy; label smoothing and class
weights as configured). That is scikit-learn's LogisticRegression with C = 1 / (l2 * n_train). The strength with
the best validation figure wins (ties: the lower validation loss). Its standardisation is folded into the saved
classifier, W' = W / sigma and b' = b - W' mu, so predict and export see an ordinary Linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from services.evaluation import validation_score
from services.objectives import Objective

# L2 strengths tried when training.weight_decay is `auto`: 10^-7 .. 10^1 in half decades (C from about 1e-1 to 1e7
# at a thousand training images), strongest first.
L2_GRID = tuple(float(f"{10**e:.3g}") for e in np.arange(1.0, -7.01, -0.5))


@dataclass
class PathPoint:
    l2: float
    score: float  # validation accuracy, or mAP (multi-label)
    loss: float  # plain validation loss
    iterations: int
    weight: np.ndarray = field(repr=False)  # [C, D], standardisation folded in
    bias: np.ndarray = field(repr=False)  # [C]


def standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation per feature (a constant feature gets 1, so it stays 0 after centring)."""
    mu = x.mean(0)
    sigma = x.std(0, unbiased=False)
    return mu, torch.where(sigma > 1e-6 * sigma.max().clamp(min=1e-12), sigma, torch.ones_like(sigma))


def solve_path(
    x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: np.ndarray,
    grid: list[float] | tuple[float, ...], objective: Objective, max_iter: int, on_point: Any = None,
) -> list[PathPoint]:  # fmt: skip
    """One PathPoint per L2 strength of `grid`, in the grid's order. Features are float32 [n, D] on the device."""
    mu, sigma = standardise(x_train)
    xs, xv = (x_train - mu) / sigma, (x_val - mu) / sigma
    classes = objective.num_classes
    weight = torch.zeros(classes, xs.shape[1], device=xs.device, requires_grad=True)
    bias = torch.zeros(classes, device=xs.device, requires_grad=True)
    y_val_t = objective.targets(y_val)
    points: dict[float, PathPoint] = {}
    for l2 in sorted(set(grid), reverse=True):  # strongest first: each solution starts the next
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                                tolerance_change=1e-10, line_search_fn="strong_wolfe")  # fmt: skip

        def closure(l2: float = l2, opt: torch.optim.LBFGS = opt) -> torch.Tensor:
            opt.zero_grad()
            loss = objective(F.linear(xs, weight, bias)[None], y_train)[0] + l2 / 2 * weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            logits = F.linear(xv, weight, bias)
            probs = (torch.sigmoid(logits) if objective.multi_label else logits.softmax(-1)).cpu().numpy()
            folded = weight / sigma
            points[l2] = PathPoint(
                l2=l2, score=validation_score(y_val, probs), loss=float(objective.plain(logits[None], y_val_t)[0]),
                iterations=int(opt.state_dict()["state"][0]["n_iter"]), weight=folded.cpu().numpy(),
                bias=(bias - folded @ mu).cpu().numpy(),
            )  # fmt: skip
        if on_point is not None:
            on_point(points[l2])
    return [points[l2] for l2 in grid]


def best(points: list[PathPoint]) -> int:
    """Index of the best validation figure; ties: the lower validation loss, then the earlier point."""
    return max(range(len(points)), key=lambda i: (np.nan_to_num(points[i].score, nan=-1.0), -points[i].loss, -i))
