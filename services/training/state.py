"""What the training loop (services/training/fit.py) and its checkpoint (services/training/checkpoint.py) share: one
`LoopState`, which the loop updates every epoch, `checkpoint.save` writes and `checkpoint.resume` restores, and each
configuration's outcome (`Result`).

Batch order needs no random state here: epoch e of a job shuffles with a generator seeded by (seed, e), so a resumed
job reads the batches a job that never stopped would have read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from services.training import halving
from services.training.metrics import HistoryRow
from services.training.runs import Runs


@dataclass
class Result:
    """One configuration's outcome: its best weights on validation, that epoch's figures, its curve."""

    state: dict[str, np.ndarray] = field(repr=False)
    score: float = -1.0  # val accuracy, or val mAP (multi-label)
    loss: float = math.inf  # plain validation loss at the best epoch
    epoch: int = 0
    history: list[HistoryRow] = field(default_factory=list)
    stopped: int | None = None  # the epoch after which early termination stopped it (then `state` is empty)


def row(fields: list[str], values: np.ndarray) -> HistoryRow:
    """An epoch's row of a configuration's curve as its history holds it (`fields`: the loop's, HistoryRow's keys)."""
    return cast(HistoryRow, {f: int(v) if f == "epoch" else float(v) for f, v in zip(fields, values, strict=True)})


@dataclass
class LoopState:
    """The loop's state after `epoch` finished epochs. Configuration j (in the job's order) trains in
    `runs[where[j][0]]` at index `where[j][1]` (None once early termination stopped it); `best[i]` holds the best
    weights so far of runs[i]'s configurations, stacked [K, ...]; `results[j]` its best figures, `curves[j]` its curve
    [epochs, fields]. Everything but the last two fields is checkpointed."""

    runs: list[Runs]
    where: list[tuple[int, int] | None]
    best: list[dict[str, np.ndarray]]
    results: list[Result]
    curves: np.ndarray
    fields: list[str]
    epoch: int = 0
    seconds: float = 0.0  # training time so far (validation excluded)
    seen: int = 0  # training images stepped on so far
    stopped: dict[int, int] = field(default_factory=dict)  # configuration -> the epoch after which it stopped
    # this process's own: configurations reported as diverged, and the first step's time (with compile, it compiles)
    warned: set[int] = field(default_factory=set)
    first_step_s: float | None = None

    @classmethod
    def start(cls, runs: list[Runs], where: list[tuple[int, int]], fields: list[str], epochs: int) -> LoopState:
        # the best weights are copied from the live ones, which the next step changes (on the CPU, `states()` are
        # views of them)
        best = [{name: np.array(v) for name, v in r.states().items()} for r in runs]
        curves = np.full((len(where), epochs, len(fields)), np.nan)
        return cls(list(runs), list(where), best, [Result(state={}) for _ in where], curves, fields)

    @property
    def flat(self) -> list[int]:
        """The configuration of each row of the runs' stacked outputs, in order (runs by runs, then within each)."""
        at = {w: j for j, w in enumerate(self.where) if w is not None}
        return [at[(i, k)] for i, r in enumerate(self.runs) for k in range(r.count)]

    def stop(self, configurations: set[int], epoch: int) -> None:
        """Configurations that stop after `epoch` leave the runs and their stacked best weights (halving.drop)."""
        self.runs, self.where, self.best = halving.drop(self.runs, self.where, self.best, configurations)
        self.stopped |= dict.fromkeys(sorted(configurations), epoch)

    def keep_best(self, improved: dict[int, list[int]]) -> None:
        """Copy the live weights of the configurations that improved ({runs index: indices within it})."""
        for i, ks in improved.items():
            for name, value in self.runs[i].states().items():
                self.best[i][name][ks] = value[ks]

    def finish(self, epochs: int) -> list[Result]:
        """Each configuration's Result, with its best weights (none once stopped) and its curve."""
        for j, (res, w) in enumerate(zip(self.results, self.where, strict=True)):
            res.state = {name: v[w[1]] for name, v in self.best[w[0]].items()} if w is not None else {}
            res.stopped = self.stopped.get(j)
            res.history = [row(self.fields, values) for values in self.curves[j, : self.stopped.get(j, epochs)]]
        return self.results
