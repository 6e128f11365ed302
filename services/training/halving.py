"""Early termination of a sweep's configurations by successive halving (Jamieson & Talwalkar, AISTATS 2016; the
synchronous form of ASHA, Li et al., MLSys 2020, which hosted AutoML sweeps run).

After a quarter and after half of the epochs (the rungs), the half of the configurations still training with the lower
best validation figure so far stop. A stopped configuration keeps its curve up to its rung and is never the job's
model. Its weights leave the stacked tensors (StackedRuns.keep), so every later step computes the survivors only: a grid
of 4 costs 4 x 1/4 + 2 x 1/4 + 1 x 1/2 = 2 configurations' training instead of 4, and a grid of 8 costs 3.5.
"""

from __future__ import annotations

import math

import numpy as np

from services.training.metrics import EarlyTermination
from services.training.runs import Runs

FRACTIONS = (0.25, 0.5)  # of the epochs: where the rungs are


def rungs(epochs: int) -> list[int]:
    """The epochs (1-based, finished) after which configurations stop: none in a run of one epoch."""
    return sorted({max(1, round(epochs * f)) for f in FRACTIONS} - {epochs})


def ranking(score: float, loss: float, j: int) -> tuple[float, float, int]:
    """How configurations rank, higher first, here and in the job's selection (fit.select): the higher validation
    figure, then the lower loss, then the earlier configuration. NaN compares false both ways, so it ranks last."""
    return (score if score == score else -math.inf, -(loss if loss == loss else math.inf), -j)


def losers(figures: dict[int, tuple[float, float]]) -> list[int]:
    """Of the configurations still training ({j: (best validation figure, its loss)}), those that stop: the lower
    half by `ranking`."""
    order = sorted(figures, key=lambda j: ranking(*figures[j], j), reverse=True)
    return sorted(order[-(-len(order) // 2) :])


def drop(
    runs: list[Runs], where: list[tuple[int, int] | None], best: list[dict[str, np.ndarray]], stop: set[int]
) -> tuple[list[Runs], list[tuple[int, int] | None], list[dict[str, np.ndarray]]]:
    """`runs`, `where` (configuration j -> (runs index, index within it), None once stopped) and the stacked best
    weights without the configurations `stop`: a Runs none of whose configurations go on is dropped whole."""
    out_runs: list[Runs] = []
    out_best: list[dict[str, np.ndarray]] = []
    out_where: list[tuple[int, int] | None] = [None] * len(where)
    for i, r in enumerate(runs):
        members = sorted((w[1], j) for j, w in enumerate(where) if w is not None and w[0] == i)
        kept = [(k, j) for k, j in members if j not in stop]
        if not kept:
            continue
        ks = [k for k, _ in kept]
        if len(ks) < r.count:
            r.keep(ks)  # only a StackedRuns holds several configurations
        out_best.append({name: v[ks] for name, v in best[i].items()})
        for pos, (_, j) in enumerate(kept):
            out_where[j] = (len(out_runs), pos)
        out_runs.append(r)
    return out_runs, out_where, out_best


def report(stopped: dict[int, int], configurations: int, epochs: int, at: list[int]) -> EarlyTermination:
    """What early termination saved: configuration-epochs trained against all of them trained to the end."""
    full = configurations * epochs
    ran = full - sum(epochs - e for e in stopped.values())
    return {
        "rungs": at,
        "stopped": len(stopped),
        "configuration_epochs": ran,
        "configuration_epochs_without": full,
        "saved_fraction": round(1 - ran / full, 4),
    }
