"""A job's TensorBoard event files (`Board`, one of its trackers: services/training/tracking.py), under the job's folder
on the store (storage/artifacts.py: `ArtifactStore.tensorboard`, `jobs/<job_id>/tensorboard/`), one run per
configuration:

    ./                          a job of one configuration: its curves, hyperparameters and evaluation; a sweep's: the
                                selected configuration's hyperparameters and the evaluation
    config_00-lr=0.01,rank=2/   each configuration of a sweep, named by its overrides: its curves and hyperparameters
    <method>/...                `method: auto`: each candidate's, as above (services/training/auto.py)

What it writes comes from where the job's metrics come from: the loop's curves (`LoopState.curves`, the rows of
metrics.json's history) as scalars per epoch (the step) tagged `train/loss`, `val/accuracy` (or `val/map`),
`val/loss`, `train/lr`, `train/seconds`; the L-BFGS probe's L2 path as `l2/...` (the step: the point's place along
its configuration's path); the hyperparameters as TensorBoard's hparams, with each configuration's best figures and
the evaluation's as their metrics (`hparams/...`); the plots (services/training/plots.py: the confusion matrix, the
curves) as images. Values that are not finite (a diverged configuration's loss) are left out.

Each run's events go to a local file (`Run`: tensorboardX's `RecordWriter`, synchronous: its `FileWriter` writes from
a thread, and its `flush` does not wait for that), copied whole onto the store under one fixed name (atomically, as
every store write) at most every `SYNC_S` seconds and at the end. A file is a function of the curves,
which the checkpoint holds: a job resumed from its checkpoint of epoch E writes a fresh local file, epochs 1..E from
the restored curves then its own, and its copy replaces the killed worker's. So each epoch is there once, even where
the killed worker had copied an epoch that its checkpoint did not keep. (The replayed events carry the resume's wall
time.)

Tracking never fails a job (`Tracker`): the first error is logged, an event says that tracking stopped, and the board
does nothing more.
"""

from __future__ import annotations

import io
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from services.jobs.progress import Reporter
from services.training.tracking import (
    ROOT,
    SYNC_S,
    HParam,
    Tracker,
    figures,
    finite,
    hyperparameters,
    l2_points,
    new_epochs,
    run_names,
)
from storage.artifacts import as_folder
from storage.store import Folder

if TYPE_CHECKING:
    from tensorboardX.proto.summary_pb2 import Summary

    from services.training.package import Packaged
    from services.training.stages import Built, Grid
    from services.training.state import LoopState

EVENTS = "events.out.tfevents.sidetune"  # TensorBoard reads the files whose name holds "tfevents"


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


class Board(Tracker):
    """A job's TensorBoard runs: a local folder of event files and its copy on the store (`folder`); without one, a
    board that writes nothing."""

    what = "TensorBoard"
    log = logging.getLogger("sidetune.tensorboard")

    def __init__(self, reporter: Reporter) -> None:
        super().__init__(reporter)
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

    # ---- what it writes -------------------------------------------------------------------------------------------
    def _record(self, state: LoopState) -> None:
        from tensorboardX.summary import scalar

        if self.folder is None:
            return
        for j, step, values in new_epochs(state, self.written):  # finite only: tensorboardX warns of each NaN
            for name, value in values.items():
                self._writer(self.names[j]).add(scalar(name, value), step)
        self._sync(force=False)

    def _close(self, error: BaseException | None) -> None:
        """Copy what is written onto the store (a failed job's curves too); `_drop` then removes the local files."""
        self._sync(force=True)

    def _finish(self, built: Built, selected: int, out: Packaged) -> None:
        from PIL import Image
        from tensorboardX.summary import image, scalar

        if self.folder is None:
            return
        metrics, metric = out["metrics"], built.objective.metric
        best = figures(metrics, metric, len(built.grid.methods))
        evaluation = {k: float(v) for k, v in out["evaluation"]["metrics"].items()}
        for j, step, values in l2_points(metrics, metric):
            for name, value in values.items():
                self._writer(self.names[j]).add(scalar(name, value), step)
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
            if finite(v):
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

    def _drop(self) -> None:
        """Close the writers and remove the local files; the board writes nothing more."""
        for writer in self.writers.values():
            try:
                writer.close()
            except Exception:  # a writer that failed to write may fail to close: its files go anyway
                self.log.debug("closing a TensorBoard writer", exc_info=True)
        if self.local is not None:
            shutil.rmtree(self.local, ignore_errors=True)
        self.writers, self.folder, self.local = {}, None, None
