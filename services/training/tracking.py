"""What a job's training tells its experiment trackers as it trains (`Tracker`), and what every tracker derives from
the job: its runs' names, its curves' tags and new epochs, its L2 path, each configuration's hyperparameters and best
figures. Three trackers: TensorBoard's event files (tensorboard.py: `Board`, every job), an MLflow server's runs
(mlflow_runs.py: `MlflowRuns`, with SIDETUNE_MLFLOW_TRACKING_URI) and a W&B project's (wandb_logger.py: `WandbRuns`,
with SIDETUNE_WANDB_PROJECT); `Trackers` feeds several as one. Each is fed from where the job's metrics come from:

    begin(built)                  train_job, once the configurations are built: their resolved hyperparameters
    record(state)                 the loop (fit.py), after every epoch and once after a resume: the curves' new rows
    finish(built, selected, out)  train_job, at its end: the L2 path, each configuration's best figures, the
                                  evaluation, the plots
    close(error)                  always (the job's `with`): what is pending, and how the job ended

A tracker never fails a job: its first error is logged, one event says that tracking stopped, and it does nothing
more. A `Halt` records that; the trackers writing one job's runs to one place share it (`method: auto`'s candidates
each open their own), so a job says it once.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from services.jobs.progress import Reporter

if TYPE_CHECKING:
    from services.training.metrics import JobMetrics
    from services.training.package import Packaged
    from services.training.stages import Built, Grid
    from services.training.state import LoopState

ROOT = "."  # the run of a job of one configuration; a sweep's parent run
SYNC_S = 10.0  # an epoch of 32 linear heads takes milliseconds: sending every epoch's figures would cost more

HParam = str | float | int | bool


def run_names(grid: Grid) -> list[str]:
    """Each configuration's run: the root for a job of one, `config_<j>-<its overrides>` in a sweep."""
    if grid.sweep is None:
        return [ROOT]
    return [
        f"config_{j:02d}-" + re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(f"{k}={v}" for k, v in overrides.items()))
        for j, overrides in enumerate(grid.sweep.configurations())
    ]


def tag(field: str) -> str:
    """A curve's column as a scalar's tag: `train_loss` -> `train/loss`, `val_accuracy` -> `val/accuracy`, `lr` ->
    `train/lr`."""
    head, _, tail = field.partition("_")
    return f"{head}/{tail}" if tail else f"train/{field}"


def hyperparameters(built: Built, j: int) -> dict[str, HParam]:
    """Configuration j's method and resolved training settings, as trackers take them (numbers, strings, booleans; a
    list as its text; unset ones left out)."""
    method = built.grid.methods[j]
    out: dict[str, HParam] = {"method": method.name}
    fields = {f"method.{k}": v for k, v in method.model_dump().items() if k != "name"} | built.hps[j].model_dump()
    for name, value in fields.items():
        if value is not None:
            out[name] = value if isinstance(value, str | float | int | bool) else str(value)
    return out


def figures(metrics: JobMetrics, metric: str, configurations: int) -> list[dict[str, float]]:
    """Each configuration's best validation figures, from the job's metrics: its best epoch's (the loop), or its
    best point's along the L2 path (the L-BFGS probe)."""
    if "l2_path" in metrics:
        out = []
        for j in range(configurations):
            points = [p for p in metrics["l2_path"] if p["config"] == j]
            best = max(points, key=lambda p: (p.get(metric, -math.inf), -p["val_loss"]))
            out.append(
                {metric: best.get(metric, math.nan), "val_loss": best["val_loss"], "weight_decay": best["weight_decay"]}
            )
        return out
    entries = metrics.get("sweep") or [metrics]
    return [
        {metric: e.get(metric, math.nan), "val_loss": e["val_loss"], "best_epoch": e.get("best_epoch", 0)}
        for e in entries
    ]


def new_epochs(state: LoopState, written: list[int]) -> Iterator[tuple[int, int, dict[str, float]]]:
    """Each configuration's finished epochs from `written[j]` on, which it then moves past them: (j, the epoch as a
    step from 1, its figures by tag that are finite); a configuration that early termination stopped has none after
    it stopped."""
    for j in range(len(written)):
        for epoch in range(written[j], state.epoch):
            values = state.curves[j, epoch]
            if math.isnan(values[0]):  # stopped before this epoch
                continue
            fields = zip(state.fields[1:], values[1:], strict=True)
            yield j, epoch + 1, {tag(name): float(value) for name, value in fields if finite(value)}
        written[j] = max(written[j], state.epoch)


def l2_points(metrics: JobMetrics, metric: str) -> Iterator[tuple[int, int, dict[str, float]]]:
    """The L-BFGS probe's L2 path, point by point: (its configuration, its place along the path, its figures that
    are finite, `l2/...`)."""
    for i, point in enumerate(metrics.get("l2_path", [])):
        values = {f"l2/{k}": float(point[k]) for k in (metric, "val_loss", "cv_std", "iterations") if k in point}
        values["l2/log10_weight_decay"] = math.log10(max(point["weight_decay"], 1e-30))
        yield point["config"], i, {k: v for k, v in values.items() if finite(v)}


def finite(value: float) -> bool:
    """Whether a figure is worth a point (a diverged configuration's NaN loss is not: trackers leave it out)."""
    return math.isfinite(value)


class Halt:
    """Whether tracking stopped, shared by the trackers that write one job's runs to one place."""

    def __init__(self) -> None:
        self.stopped = False


class Tracker:
    """One tracker of a job (see the module's docstring). Subclasses write in `_begin`, `_record`, `_finish` and
    `_close`, and forget what they hold in `_drop`; the public methods run them unless tracking stopped, and stop it
    on their first error."""

    what = "tracking"  # its name in the event that says it stopped
    log = logging.getLogger("sidetune.tracking")

    def __init__(self, reporter: Reporter, halt: Halt | None = None) -> None:
        self.reporter = reporter
        self.halt = halt or Halt()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        self.close(error if isinstance(error, BaseException) else None)

    def begin(self, built: Built) -> None:
        """The configurations are built: their resolved hyperparameters."""
        self._guard(lambda: self._begin(built))

    def record(self, state: LoopState) -> None:
        """Each configuration's finished epochs that are not written yet (after a resume: first every epoch that the
        checkpoint kept); a configuration that early termination stopped has no rows after it stopped."""
        self._guard(lambda: self._record(state))

    def finish(self, built: Built, selected: int, out: Packaged) -> None:
        """The job's end: the L2 path, every configuration's best figures, the evaluation, the plots."""
        self._guard(lambda: self._finish(built, selected, out))

    def close(self, error: BaseException | None = None) -> None:
        """What is pending, written; the job ended (`error`: how it failed, or was cancelled)."""
        self._guard(lambda: self._close(error))
        self._drop()

    def _begin(self, built: Built) -> None:
        pass

    def _record(self, state: LoopState) -> None:
        pass

    def _finish(self, built: Built, selected: int, out: Packaged) -> None:
        pass

    def _close(self, error: BaseException | None) -> None:
        pass

    def _drop(self) -> None:
        pass

    def _guard(self, call: Callable[[], None]) -> None:
        """Run `call` unless tracking stopped; its error stops tracking (logged, and an event says so)."""
        if self.halt.stopped:
            return
        try:
            call()
        except Exception as e:
            self.log.warning("%s tracking stopped", self.what, exc_info=True)
            self.reporter.event(
                f"{self.what} tracking stopped ({type(e).__name__}: {e}); the job goes on without it", level="warning"
            )
            self.halt.stopped = True
            self._drop()


class Trackers(Tracker):
    """Several trackers fed as one (each stops on its own)."""

    def __init__(self, reporter: Reporter, trackers: list[Tracker]) -> None:
        super().__init__(reporter)
        self.trackers = trackers

    def begin(self, built: Built) -> None:
        for t in self.trackers:
            t.begin(built)

    def record(self, state: LoopState) -> None:
        for t in self.trackers:
            t.record(state)

    def finish(self, built: Built, selected: int, out: Packaged) -> None:
        for t in self.trackers:
            t.finish(built, selected, out)

    def close(self, error: BaseException | None = None) -> None:
        for t in self.trackers:
            t.close(error)
