"""A job's TensorBoard event files (`Board`), under the job's folder on the store (storage/artifacts.py:
`ArtifactStore.tensorboard`, `jobs/<job_id>/tensorboard/`), one run per configuration:

    ./                          a job of one configuration: its curves, hyperparameters and evaluation; a sweep's: the
                                selected configuration's hyperparameters and the evaluation
    config_00-lr=0.01,rank=2/   each configuration of a sweep, named by its overrides: its curves and hyperparameters
    <method>/...                `method: auto`: each candidate's, as above (services/training/auto.py)

What it writes comes from where the job's metrics come from: the loop's curves (`LoopState.curves`, the rows of
metrics.json's history) as scalars per epoch (the step) tagged `train/loss`, `val/accuracy` (or `val/map`),
`val/loss`, `train/lr`, `train/seconds`; the L-BFGS probe's L2 path as `l2/...` (the step: the point's place along
its configuration's path); the hyperparameters as TensorBoard's hparams, with each configuration's best figures and
the evaluation's as their metrics (`hparams/...`); the plots (services/training/plots.py: the confusion matrix, the
curves) as images.

Each run's events go to a local file (`Run`: tensorboardX's `RecordWriter`, synchronous: its `FileWriter` writes from
a thread, and its `flush` does not wait for that), copied whole onto the store under one fixed name (atomically, as
every store write) at most every `SYNC_S` seconds and at the end. A file is a function of the curves,
which the checkpoint holds: a job resumed from its checkpoint of epoch E writes a fresh local file, epochs 1..E from
the restored curves then its own, and its copy replaces the killed worker's. So each epoch is there once, even where
the killed worker had copied an epoch that its checkpoint did not keep. (The replayed events carry the resume's wall
time.)

Tracking never fails a job: the first error is logged, an event says that tracking stopped, and the board does
nothing more.
"""

from __future__ import annotations

import io
import logging
import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from services.jobs.progress import Reporter
from storage.artifacts import as_folder
from storage.store import Folder

if TYPE_CHECKING:
    from tensorboardX.proto.summary_pb2 import Summary

    from services.training.metrics import JobMetrics
    from services.training.package import Packaged
    from services.training.stages import Built, Grid
    from services.training.state import LoopState

log = logging.getLogger("sidetune.tensorboard")

EVENTS = "events.out.tfevents.sidetune"  # TensorBoard reads the files whose name holds "tfevents"
ROOT = "."
SYNC_S = 10.0  # an epoch of 32 linear heads takes milliseconds: copying every epoch's files would cost more

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
    """Configuration j's method and resolved training settings, as TensorBoard's hparams take them (numbers,
    strings, booleans; a list as its text; unset ones left out)."""
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


class Run:
    """One run's event file, written in this process: the file's version first, then each summary as an event."""

    def __init__(self, path: Path) -> None:
        from tensorboardX import RecordWriter

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.writer = path, RecordWriter(str(path))
        self._write(file_version="brain.Event:2")

    def add(self, summary: Summary, step: int) -> None:
        self._write(step=step, summary=summary)

    def _write(self, **fields: object) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self.writer.write(Event(wall_time=time.time(), **fields).SerializeToString())

    def read(self) -> bytes:
        self.writer.flush()
        return self.path.read_bytes()

    def close(self) -> None:
        self.writer.close()


class Board:
    """A job's TensorBoard runs: a local folder of event files and its copy on the store (`folder`); without one, a
    board that writes nothing."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.folder: Folder | None = None  # None: writes nothing (none given, or tracking stopped)
        self.local: Path | None = None
        self.names: list[str] = []
        self.writers: dict[str, Run] = {}
        self.written: list[int] = []  # each configuration's epochs written
        self.synced_at = -math.inf

    @classmethod
    def open(cls, where: Folder | Path | None, grid: Grid, reporter: Reporter) -> Board:
        """The board of a job whose runs go to `where` (None: a board that writes nothing)."""
        board = cls(reporter)
        if where is not None:
            board._guard(lambda: board._start(as_folder(where), run_names(grid)))
        return board

    def _start(self, folder: Folder, names: list[str]) -> None:
        import tensorboardX  # noqa: F401 - missing, tracking stops here rather than at the first epoch

        self.names, self.written = names, [0] * len(names)
        self.local = Path(tempfile.mkdtemp(prefix="sidetune-tensorboard-"))
        self.folder = folder

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, state: LoopState) -> None:
        """Each configuration's finished epochs that are not written yet (after a resume: first every epoch that the
        checkpoint kept); a configuration that early termination stopped has no rows after it stopped."""
        self._guard(lambda: self._record(state))

    def finish(self, built: Built, selected: int, out: Packaged) -> None:
        """The job's end: the L2 path, the hyperparameters of every run with its best figures (and the root's with
        the evaluation's), the plots; then every file onto the store."""
        self._guard(lambda: self._finish(built, selected, out))

    def close(self) -> None:
        """Copy what is written onto the store (a failed job's curves too) and remove the local files."""
        self._guard(lambda: self._sync(force=True))
        self._drop()

    # ---- what it writes -------------------------------------------------------------------------------------------
    def _record(self, state: LoopState) -> None:
        from tensorboardX.summary import scalar

        if self.folder is None:
            return
        for j, name in enumerate(self.names):
            for epoch in range(self.written[j], state.epoch):
                values = state.curves[j, epoch]
                if math.isnan(values[0]):  # stopped before this epoch
                    continue
                for field, value in zip(state.fields[1:], values[1:], strict=True):
                    self._writer(name).add(scalar(tag(field), float(value)), epoch + 1)
            self.written[j] = max(self.written[j], state.epoch)
        self._sync(force=False)

    def _finish(self, built: Built, selected: int, out: Packaged) -> None:
        from PIL import Image
        from tensorboardX.summary import image, scalar

        if self.folder is None:
            return
        metrics, metric = out["metrics"], built.objective.metric
        best = figures(metrics, metric, len(built.grid.methods))
        evaluation = {k: float(v) for k, v in out["evaluation"]["metrics"].items()}
        for i, point in enumerate(metrics.get("l2_path", [])):
            run = self._writer(self.names[point["config"]])
            for name in (metric, "val_loss", "cv_std", "iterations"):
                if name in point:
                    run.add(scalar(f"l2/{name}", float(point[name])), i)
            run.add(scalar("l2/log10_weight_decay", math.log10(max(point["weight_decay"], 1e-30))), i)
        keys = sorted({k for f in best for k in f} | set(evaluation))
        runs = [(name, j, best[j]) for j, name in enumerate(self.names)]
        if ROOT not in self.names:  # a sweep: the root holds the selected configuration and the evaluation
            runs.append((ROOT, selected, best[selected]))
        for name, j, values in runs:
            self._hparams(name, hyperparameters(built, j), values | (evaluation if name == ROOT else {}), keys)
        for name, png in out["plots"].items():
            pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            self._writer(ROOT).add(image(f"plots/{name}", pixels, dataformats="HWC"), 0)
        self._sync(force=True)

    def _hparams(self, name: str, hparams: dict[str, HParam], values: dict[str, float], keys: list[str]) -> None:
        """A run's hyperparameters as a session of TensorBoard's hparams, its metrics the `hparams/...` scalars (every
        run names the same metrics, whichever run TensorBoard reads the experiment from)."""
        from tensorboardX.summary import hparams as summaries
        from tensorboardX.summary import scalar

        run = self._writer(name)
        for summary in summaries(hparams, dict.fromkeys((f"hparams/{k}" for k in keys), 0.0)):
            run.add(summary, 0)
        for k, v in values.items():
            run.add(scalar(f"hparams/{k}", float(v)), 0)

    # ---- files ------------------------------------------------------------------------------------------------
    def _writer(self, name: str) -> Run:
        if name not in self.writers:
            assert self.local is not None
            self.writers[name] = Run(self.local / name / EVENTS)
        return self.writers[name]

    def _sync(self, force: bool) -> None:
        """Every run's event file onto the store under its fixed name, unless the last copy is under `SYNC_S`
        seconds old (`force`: now)."""
        if self.folder is None or self.local is None or not (force or time.monotonic() - self.synced_at >= SYNC_S):
            return
        for name, run in self.writers.items():
            (self.folder if name == ROOT else self.folder.child(name)).write_bytes(EVENTS, run.read())
        self.synced_at = time.monotonic()

    def _guard(self, call: Callable[[], None]) -> None:
        """Run `call` unless tracking stopped; its error stops tracking (logged, and an event says so)."""
        try:
            call()
        except Exception as e:
            log.warning("TensorBoard tracking stopped", exc_info=True)
            self.reporter.event(
                f"TensorBoard tracking stopped ({type(e).__name__}: {e}); the job goes on without it", level="warning"
            )
            self._drop()

    def _drop(self) -> None:
        """Close the writers and remove the local files; the board writes nothing more."""
        for writer in self.writers.values():
            try:
                writer.close()
            except Exception:  # a writer that failed to write may fail to close: its files go anyway
                log.debug("closing a TensorBoard writer", exc_info=True)
        if self.local is not None:
            shutil.rmtree(self.local, ignore_errors=True)
        self.writers, self.folder, self.local = {}, None, None
