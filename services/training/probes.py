"""The linear probe of a job by the standard protocol (L-BFGS on the cached, pooled features): every L2 strength of
the grid scored by stratified k-fold cross-validation over the training and validation images (by the validation
split for large jobs), the best refitted on all of them. The solver itself is services/training/lbfgs.py.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from services.data.sources import Source
from services.jobs.progress import Reporter
from services.spec import Hyperparameters, JobSpec
from services.training import lbfgs
from services.training.fit import Result, batches_of
from services.training.objectives import Objective

# per scored strength a Result, its figures; the timings; the training split's own fit (or None)
Solved = tuple[list[Result], list[dict[str, Any]], dict[str, Any], dict[str, np.ndarray] | None]


def solve_probes(
    spec: JobSpec,
    configs: list[JobSpec],
    hps: list[Hyperparameters],
    models: list[torch.nn.Module],
    sources: list[Source],
    targets: list[np.ndarray],
    objective: Objective,
    reporter: Reporter,
    held_out: bool = False,
) -> Solved:
    """The L-BFGS linear probe of every configuration (services/training/lbfgs.py) by the standard protocol:
    the pooled features of every distinct pooling from one pass over the cache; each L2 strength (the sweep's
    `weight_decay` values, the job's own, or the default grid when it is `auto`) scored by k-fold cross-validation
    over the training and validation images (by the validation split above `method.cv_max_images`, or with
    `method.cv_folds` below 2); the best strength then refitted on every training and validation image. The test
    split is never read here. Returns one Result per scored strength (only the refitted one has weights), each
    point's figures, the timings with the protocol's figures, and with `held_out` the weights of a fit on the
    training split alone at the chosen strength (what a validation report or threshold may judge: the refit has seen
    the validation images), else None."""
    t0 = time.perf_counter()
    auto = spec.training.weight_decay == "auto" and not (spec.sweep and spec.sweep.weight_decay)
    grids = [list(lbfgs.L2_GRID) if auto else [h.weight_decay] for h in hps]
    by_pool: dict[str, list[int]] = {}
    for j, c in enumerate(configs):
        by_pool.setdefault(c.method.pool, []).append(j)
    probes = [models[js[0]] for js in by_pool.values()]
    n_train = len(targets[0])
    labels = np.concatenate(targets)  # training rows first, then validation: the features' order below
    per_probe: list[list[torch.Tensor]] = [[] for _ in probes]
    for source, y in zip(sources, targets, strict=True):
        with torch.no_grad():  # not inference_mode: the features enter the solver's autograd graph
            for x, _ in source.iterate(batches_of(np.arange(len(y)), 1024)):  # cached rows, in order: all kept
                for out, probe in zip(per_probe, probes, strict=True):
                    out.append(probe.features(x))
    feats = [torch.cat(f) for f in per_probe]  # [n_train + n_val, D] per pooling; the splits are views of it
    del per_probe
    y_all = objective.targets(labels)
    k = _folds(spec.method, labels)
    held = lbfgs.folds(labels, k, spec.dataset.split_seed) if k else []
    candidates, points = [], []  # (pooling, strength) scored, and their figures
    iterations = 0
    grids_by_pool = []
    for p, (pool, js) in enumerate(by_pool.items()):
        grid = sorted({l2 for j in js for l2 in grids[j]}, reverse=True)
        grids_by_pool.append(grid)
        max_iter = configs[js[0]].method.max_iter
        if k:
            scored = lbfgs.cross_validate(
                feats[p], y_all, labels, held, grid, objective, max_iter, reporter.check_cancel
            )
        else:
            scored = lbfgs.solve_path(
                feats[p][:n_train],
                y_all[:n_train],
                feats[p][n_train:],
                targets[1],
                grid,
                objective,
                max_iter,
                keep=False,
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
    chosen = lbfgs.choose([point for _, point in candidates])
    p, point = candidates[chosen]
    # the refit keeps the chosen strength per image, scikit-learn's C = 1 / (l2 n), as GridSearchCV(refit=True)
    # keeps C: l2 n is the penalty against the summed loss, and more images then weigh more against it. It follows
    # the path that scored the strength, from the strongest of the grid down to it.
    fitted = np.mean([len(labels) - len(h) for h in held]) if k else n_train
    path = [float(f"{l2 * fitted / len(labels):.6g}") for l2 in grids_by_pool[p] if l2 >= point.l2]
    l2 = path[-1]
    t_refit = time.perf_counter()
    weight, bias, refit_iterations = lbfgs.refit(feats[p], y_all, path, objective, configs[0].method.max_iter)
    refit_seconds = time.perf_counter() - t_refit
    base = {name: v.detach().cpu().numpy() for name, v in probes[p].state_dict().items()}
    held_state = None
    if held_out:  # the chosen strength on the training rows alone, its C kept as the refit keeps it
        train_path = [l2 * fitted / n_train for l2 in grids_by_pool[p] if l2 >= point.l2]
        w, b, _ = lbfgs.refit(feats[p][:n_train], y_all[:n_train], train_path, objective, configs[0].method.max_iter)
        held_state = {**base, "head.weight": w, "head.bias": b}
    results = [
        Result(
            state={**base, "head.weight": weight, "head.bias": bias} if i == chosen else {},
            score=pt.score,
            loss=pt.loss,
        )
        for i, (_, pt) in enumerate(candidates)
    ]
    seconds = time.perf_counter() - t0
    if k:
        how = f"{k}-fold cross-validation over {len(labels)} training and validation images"
        figure = f"{point.score:.4f} +- {point.std:.4f}"
    else:
        how = f"the validation split ({len(labels) - n_train} images)"
        figure = f"{point.score:.4f}"
    selection = {
        "protocol": "cross-validation" if k else "validation",
        "folds": k,
        "images": len(labels) if k else len(labels) - n_train,
        "score": round(point.score, 5),
    }
    if k:
        selection |= {"std": round(point.std, 5), "fold_scores": [round(s, 5) for s in point.fold_scores]}
    refit = {
        "images": len(labels),
        "weight_decay": l2,
        "iterations": refit_iterations,
        "seconds": round(refit_seconds, 3),
    }
    reporter.event(
        f"L-BFGS linear probe: {len(points)} L2 strengths scored by {how} ({iterations} iterations), "
        f"best {point.l2:.3g} ({objective.metric} {figure}), refitted at {l2:.3g} on all {len(labels)} "
        f"training and validation images ({refit_iterations} iterations) in {seconds:.2f}s",
        data={"l2_path": points, "selection": selection, "refit": refit},
    )
    timing = {
        "train_seconds": round(seconds, 3),
        "train_images_per_s": round(n_train * len(points) / max(seconds, 1e-9), 1),
        "selection": selection,
        "refit": refit,
    }
    return results, points, timing, held_state


def _folds(method: Any, labels: np.ndarray) -> int:
    """The folds of the linear probe's cross-validation: `method.cv_folds`, at most the images of the largest class
    (scikit-learn's StratifiedKFold needs that many; a rarer class is then missing from some folds) or of the
    split; 0 (the validation protocol) for fewer than 2 or above `method.cv_max_images` images."""
    if method.cv_folds < 2 or len(labels) > method.cv_max_images:
        return 0
    largest = int(np.bincount(labels).max()) if labels.ndim == 1 else len(labels)
    k = min(method.cv_folds, largest, len(labels))
    return k if k >= 2 else 0
