"""The linear probe of a job by the standard protocol (L-BFGS on the cached, pooled features): every L2 strength of
the grid scored by stratified k-fold cross-validation over the training and validation images (by the validation
split for large jobs), the best refitted on all of them. The solver itself is services/training/lbfgs.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from services.data.sources import Source
from services.jobs.progress import Reporter
from services.methods.linear.config import LinearConfig
from services.spec import Hyperparameters, JobSpec
from services.training import lbfgs
from services.training.fit import batches_of
from services.training.metrics import L2Point, Refit, Selection, Timing
from services.training.objectives import Objective
from services.training.stages import Optimised
from services.training.state import Result

Point = lbfgs.PathPoint | lbfgs.CvPoint  # a scored strength: on the validation split, or cross-validated


@dataclass(frozen=True)
class L2Search:
    """What the protocol reads of the job's spec: whether it scores the default grid of L2 strengths
    (`training.weight_decay: auto` without `sweep.weight_decay`; else each configuration's own strength) and the
    seed of its folds (`dataset.split_seed`)."""

    default_grid: bool
    seed: int

    @classmethod
    def of(cls, spec: JobSpec) -> L2Search:
        auto = spec.training.weight_decay == "auto" and not (spec.sweep and spec.sweep.weight_decay)
        return cls(auto, spec.dataset.split_seed)


@dataclass
class _Rows:
    """The rows the protocol fits and scores, training rows first, then validation: per pooling their features
    [n_train + n_val, D] (the splits are views of them), their targets as the objective reads them, their labels;
    the cross-validation's folds (k = 0: the validation split scores)."""

    feats: list[torch.Tensor]
    y: torch.Tensor
    labels: np.ndarray
    n_train: int
    k: int
    held: list[np.ndarray]


def solve_probes(
    search: L2Search,
    configs: list[LinearConfig],
    hps: list[Hyperparameters],
    models: list[torch.nn.Module],
    sources: list[Source],
    targets: list[np.ndarray],
    objective: Objective,
    reporter: Reporter,
    held_out: bool = False,
) -> Optimised:
    """The L-BFGS linear probe of every configuration (`configs`: their method configs; services/training/lbfgs.py)
    by the standard protocol: the pooled features of every distinct pooling from one pass over the cache; each L2
    strength (the sweep's `weight_decay` values, the job's own, or the default grid: `search`) scored by k-fold
    cross-validation over the training and validation images (by the validation split above `method.cv_max_images`,
    or with `method.cv_folds` below 2); the best strength then refitted on every training and validation image. The
    test split is never read here. Returns one Result per scored strength (only the refitted one has weights), each
    point's figures, the timings with the protocol's figures, and with `held_out` the weights of a fit on the
    training split alone at the chosen strength (what a validation report or threshold may judge: the refit has seen
    the validation images)."""
    t0 = time.perf_counter()
    grids = [list(lbfgs.L2_GRID) if search.default_grid else [h.weight_decay] for h in hps]
    by_pool: dict[str, list[int]] = {}
    for j, c in enumerate(configs):
        by_pool.setdefault(c.pool, []).append(j)
    probes = [models[js[0]] for js in by_pool.values()]
    labels = np.concatenate(targets)  # training rows first, then validation: the features' order
    k = _folds(configs[0], labels)  # the folds' settings: the job's, which a sweep does not vary
    held = lbfgs.folds(labels, k, search.seed) if k else []
    rows = _Rows(_features(probes, sources, targets), objective.targets(labels), labels, len(targets[0]), k, held)
    with lbfgs.threads_for(max(rows.feats, key=torch.Tensor.numel), objective.num_classes):
        candidates, points, paths, iterations = _score(configs, by_pool, grids, rows, objective, reporter)
        chosen = lbfgs.choose([point for _, point in candidates])
        p, point = candidates[chosen]
        max_iter = configs[0].max_iter
        refit, weights, held_state = _refit(rows, p, paths[p], point, probes[p], objective, max_iter, held_out)
    results = [
        Result(state=weights if i == chosen else {}, score=pt.score, loss=pt.loss)
        for i, (_, pt) in enumerate(candidates)
    ]
    timing = _report(rows, point, points, iterations, refit, time.perf_counter() - t0, objective, reporter)
    return Optimised(results, timing, [p["config"] for p in points], points, held_state)


def _features(probes: list[torch.nn.Module], sources: list[Source], targets: list[np.ndarray]) -> list[torch.Tensor]:
    """Every probe's pooled features of every row of the sources, in order, from one pass over them."""
    per_probe: list[list[torch.Tensor]] = [[] for _ in probes]
    for source, y in zip(sources, targets, strict=True):
        with torch.no_grad():  # not inference_mode: the features enter the solver's autograd graph
            for x, _ in source.iterate(batches_of(np.arange(len(y)), 1024)):  # cached rows, in order: all kept
                for out, probe in zip(per_probe, probes, strict=True):
                    out.append(probe.features(x))
    return [torch.cat(f) for f in per_probe]


def _score(
    configs: list[LinearConfig],
    by_pool: dict[str, list[int]],
    grids: list[list[float]],
    rows: _Rows,
    objective: Objective,
    reporter: Reporter,
) -> tuple[list[tuple[int, Point]], list[L2Point], list[list[float]], int]:
    """Each pooling's L2 path, strongest first, scored on held-out rows: the (pooling, point) candidates of every
    configuration and their figures, each pooling's path, the iterations spent."""
    candidates: list[tuple[int, Point]] = []
    points: list[L2Point] = []
    paths: list[list[float]] = []
    iterations = 0
    n_train, k = rows.n_train, rows.k
    for p, (pool, js) in enumerate(by_pool.items()):
        grid = sorted({l2 for j in js for l2 in grids[j]}, reverse=True)
        paths.append(grid)
        max_iter, x = configs[js[0]].max_iter, rows.feats[p]
        if k:
            scored = lbfgs.cross_validate(
                x, rows.y, rows.labels, rows.held, grid, objective, max_iter, reporter.check_cancel
            )
        else:
            scored = lbfgs.solve_path(
                x[:n_train], rows.y[:n_train], x[n_train:], rows.labels[n_train:], grid, objective, max_iter, keep=False
            )
        for j in js:
            for point in (pt for pt in scored if pt.l2 in grids[j]):
                candidates.append((p, point))
                points.append(
                    {
                        "config": j,
                        "pool": pool,
                        "weight_decay": point.l2,
                        objective.metric: round(point.score, 5),
                        "val_loss": round(point.loss, 5),
                        **({"cv_std": round(point.std, 5)} if k else {}),
                        "iterations": point.iterations,
                    }
                )
        iterations += sum(pt.iterations for pt in scored)
        reporter.check_cancel()
    return candidates, points, paths, iterations


def _refit(
    rows: _Rows,
    p: int,
    grid: list[float],
    point: Point,
    probe: torch.nn.Module,
    objective: Objective,
    max_iter: int,
    held_out: bool,
) -> tuple[Refit, dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Pooling p's chosen strength refitted on every row: the refit's figures, its weights, and with `held_out` the
    weights of the same strength fitted on the training rows alone (else None)."""
    labels, n_train, x, y = rows.labels, rows.n_train, rows.feats[p], rows.y
    # the refit keeps the chosen strength per image, scikit-learn's C = 1 / (l2 n), as GridSearchCV(refit=True)
    # keeps C: l2 n is the penalty against the summed loss, and more images then weigh more against it. It follows
    # the path that scored the strength, from the strongest of the grid down to it.
    fitted = np.mean([len(labels) - len(h) for h in rows.held]) if rows.k else n_train
    path = [float(f"{l2 * fitted / len(labels):.6g}") for l2 in grid if l2 >= point.l2]
    t0 = time.perf_counter()
    weight, bias, iterations = lbfgs.refit(x, y, path, objective, max_iter)
    seconds = time.perf_counter() - t0
    base = {name: v.detach().cpu().numpy() for name, v in probe.state_dict().items()}
    held_state = None
    if held_out:  # the chosen strength on the training rows alone, its C kept as the refit keeps it
        train_path = [l2 * fitted / n_train for l2 in grid if l2 >= point.l2]
        w, b, _ = lbfgs.refit(x[:n_train], y[:n_train], train_path, objective, max_iter)
        held_state = {**base, "head.weight": w, "head.bias": b}
    refit: Refit = {
        "images": len(labels),
        "weight_decay": path[-1],
        "iterations": iterations,
        "seconds": round(seconds, 3),
    }
    return refit, {**base, "head.weight": weight, "head.bias": bias}, held_state


def _report(
    rows: _Rows,
    point: Point,
    points: list[L2Point],
    iterations: int,
    refit: Refit,
    seconds: float,
    objective: Objective,
    reporter: Reporter,
) -> Timing:
    """The protocol's event (the path, the selection, the refit) and the job's timings with its figures."""
    labels, n_train, k = rows.labels, rows.n_train, rows.k
    if k:
        how = f"{k}-fold cross-validation over {len(labels)} training and validation images"
        figure = f"{point.score:.4f} +- {point.std:.4f}"
    else:
        how = f"the validation split ({len(labels) - n_train} images)"
        figure = f"{point.score:.4f}"
    selection: Selection = {
        "protocol": "cross-validation" if k else "validation",
        "folds": k,
        "images": len(labels) if k else len(labels) - n_train,
        "score": round(point.score, 5),
    }
    if k:
        selection |= {"std": round(point.std, 5), "fold_scores": [round(s, 5) for s in point.fold_scores]}
    reporter.event(
        f"L-BFGS linear probe: {len(points)} L2 strengths scored by {how} ({iterations} iterations), "
        f"best {point.l2:.3g} ({objective.metric} {figure}), refitted at {refit['weight_decay']:.3g} on all "
        f"{len(labels)} training and validation images ({refit['iterations']} iterations) in {seconds:.2f}s",
        data={"l2_path": points, "selection": selection, "refit": refit},
    )
    return {
        "train_seconds": round(seconds, 3),
        "train_images_per_s": round(n_train * len(points) / max(seconds, 1e-9), 1),
        "selection": selection,
        "refit": refit,
    }


def _folds(method: LinearConfig, labels: np.ndarray) -> int:
    """The folds of the linear probe's cross-validation: `method.cv_folds`, at most the images of the largest class
    (scikit-learn's StratifiedKFold needs that many; a rarer class is then missing from some folds) or of the
    split; 0 (the validation protocol) for fewer than 2 or above `method.cv_max_images` images."""
    if method.cv_folds < 2 or len(labels) > method.cv_max_images:
        return 0
    largest = int(np.bincount(labels).max()) if labels.ndim == 1 else len(labels)
    k = min(method.cv_folds, largest, len(labels))
    return k if k >= 2 else 0
