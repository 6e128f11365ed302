"""A job's Weights & Biases runs (`WandbRuns`, one of its trackers: services/training/tracking.py), with
SIDETUNE_WANDB_PROJECT (the `wandb` extra; wandb is imported here only, by the train worker, and only then). The same
events as its TensorBoard and MLflow runs, every run in the W&B group named by the job's id:

    <job name or id>          the job's run (job type `job`): a job of one configuration's hyperparameters (config) and
                              curves; a sweep's selected configuration's; in its summary the best figures (`best/...`)
                              and the evaluation's (`evaluation/test_accuracy`, ...); the plots as images
    <job>/config_00-lr=0.01   each configuration of a sweep (`configuration`): its hyperparameters, curves, best figures
    `method: auto`            the job's run holds the chosen candidate's evaluation and plots and each candidate's
                              figures (`linear/val_accuracy`); each candidate's runs are as above, named
                              `<job>/<method>` (`candidate`; `WandbJob.candidate_of`)

Every run's config holds `sidetune.job_id` and `sidetune.model_id` (and `sidetune.owner`), its tags `sidetune` and the
method. Its history: per epoch (the step) `train/loss`, `val/accuracy` (or `val/map`), `val/loss`, `train/lr`,
`train/seconds` (tracking.py: `tag`); the L-BFGS probe's path `l2/...` (the step: the point's place along it). Values
that are not finite are left out. `log` hands a row to W&B's own service process, which sends it (with
WANDB_MODE=offline: writes it under WANDB_DIR, for `wandb sync`), so rows go as they come (no `SYNC_S`).

The runs end finished with the job, failed where it fails or is cancelled. Their ids come from the job's id, and they
open with `resume="allow"`: a job that a killed worker left continues the same runs; W&B keeps the steps it has, and
the resumed job logs the epochs after them. W&B's own variables configure it: WANDB_API_KEY (or `wandb login`),
WANDB_ENTITY, WANDB_MODE, WANDB_INIT_TIMEOUT, WANDB_DIR (unset: the data dir, under whose `wandb/` the runs' files go).
A W&B that fails (not installed, unreachable, its service gone) stops the job's tracking with one event, never the job;
its runs are ended and W&B's state in the process reset (`wandb.teardown`), so the worker's next job starts afresh.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from services.jobs.progress import Reporter
from services.training.tracking import (
    ROOT,
    Halt,
    HParam,
    Tracker,
    figures,
    finite,
    hyperparameters,
    l2_points,
    new_epochs,
    run_names,
)
from storage.settings import Settings

if TYPE_CHECKING:
    from wandb import Run

    from services.training.metrics import Candidate
    from services.training.package import Packaged
    from services.training.stages import Built, Grid
    from services.training.state import LoopState


@dataclass(frozen=True)
class WandbJob:
    """Where a job's runs go, and what names them and links them back to it; a candidate of `method: auto` names its
    runs after its method (`candidate`). The job's trackers share `halt`."""

    project: str
    job_id: str
    model_id: str
    name: str | None = None
    owner: str | None = None
    directory: str | None = None  # wandb.init's `dir`; None: WANDB_DIR says where
    candidate: str | None = None
    halt: Halt = field(default_factory=Halt, compare=False, repr=False)

    @classmethod
    def of(cls, settings: Settings, job_id: str, model_id: str, name: str | None, owner: str | None) -> WandbJob | None:
        """The job's W&B runs, where a project is set."""
        if not settings.wandb_project:
            return None
        directory = None if os.environ.get("WANDB_DIR") else str(settings.data_path)
        return cls(settings.wandb_project, job_id, model_id, name, owner, directory)

    def candidate_of(self, method: str) -> WandbJob:
        return replace(self, candidate=method)

    def display(self, run: str) -> str:
        """A run's name: the job's, then the candidate's method and the configuration's run."""
        parts = (self.name or self.job_id, self.candidate, None if run == ROOT else run)
        return "/".join(p for p in parts if p)

    def run_id(self, run: str) -> str:
        """The same id for the same job, candidate and run: a resumed job continues its runs."""
        return hashlib.sha256(f"{self.job_id}/{self.candidate or ''}/{run}".encode()).hexdigest()[:24]

    def config(self) -> dict[str, HParam]:
        """What every run's config holds of the job (a candidate's: its method too)."""
        ids: dict[str, HParam] = {"sidetune.job_id": self.job_id, "sidetune.model_id": self.model_id}
        return (
            ids
            | ({"sidetune.owner": self.owner} if self.owner else {})
            | ({"sidetune.candidate": self.candidate} if self.candidate else {})
        )


class WandbRuns(Tracker):
    """A job's W&B runs: its run (ROOT) and, in a sweep, a run per configuration (`names`); without a project (`job`
    None), a tracker that writes nothing."""

    what = "W&B"

    def __init__(self, reporter: Reporter, halt: Halt | None = None) -> None:
        super().__init__(reporter, halt)
        self.job: WandbJob | None = None  # None: writes nothing
        self.names: list[str] = []  # each configuration's run (a job of one: the root)
        self.runs: dict[str, Run] = {}
        self.written: list[int] = []  # each configuration's epochs logged
        self.imported = False  # whether wandb was imported: W&B's state is then reset after a failure

    @classmethod
    def open(cls, job: WandbJob | None, grid: Grid | None, reporter: Reporter) -> WandbRuns:
        """The runs of a job (`grid`: its configurations; None: the job's run alone, its candidates' parent)."""
        runs = cls(reporter, job.halt if job is not None else None)
        if job is not None:
            runs._guard(lambda: runs._start(job, grid))
        return runs

    def _start(self, job: WandbJob, grid: Grid | None) -> None:
        import wandb  # noqa: F401 - missing, tracking stops here rather than at the first epoch

        self.job, self.imported = job, True
        self.names = run_names(grid) if grid is not None else [ROOT]
        sweep = {"sidetune.sweep": grid.sweep.describe()} if grid is not None and grid.sweep is not None else {}
        self._init(ROOT, "candidate" if job.candidate else "job", grid.methods[0].name if grid else "auto", sweep)
        for j, name in enumerate(self.names):
            if name != ROOT:
                assert grid is not None
                self._init(name, "configuration", grid.methods[j].name, {"sidetune.configuration": j})
        # a resumed run's last step is its last epoch logged
        self.written = [max(0, self.runs[name].starting_step - 1) for name in self.names]
        if job.candidate is None:  # offline, a run has no address
            url = self.runs[ROOT].url
            where = f"group {job.job_id} of project {job.project!r}" + (f", run {url}" if url else "")
            self.reporter.event(f"tracking in W&B: {where}")

    def _init(self, name: str, kind: str, method: str, config: dict[str, HParam]) -> None:
        import wandb

        assert self.job is not None
        self.runs[name] = wandb.init(
            project=self.job.project,
            name=self.job.display(name),
            id=self.job.run_id(name),
            resume="allow",
            group=self.job.job_id,
            job_type=kind,
            tags=["sidetune", method],
            config=self.job.config() | config,
            dir=self.job.directory,
            reinit="create_new",  # the job's runs side by side
            settings=wandb.Settings(console="off", silent=True),  # the worker's output stays its own
        )

    def candidate(self, method: str) -> WandbJob | None:
        """Where a candidate of `method: auto` writes its runs: in the job's group (None: tracking stopped)."""
        if self.job is None or self.halt.stopped:
            return None
        return self.job.candidate_of(method)

    # ---- what it writes -------------------------------------------------------------------------------------------
    def _begin(self, built: Built) -> None:
        if self.job is None:
            return
        for j, name in enumerate(self.names):
            self.runs[name].config.update(hyperparameters(built, j))

    def _record(self, state: LoopState) -> None:
        if self.job is None:
            return
        for j, step, values in new_epochs(state, self.written):
            self.runs[self.names[j]].log(values, step=step)

    def _finish(self, built: Built, selected: int, out: Packaged) -> None:
        if self.job is None:
            return
        metrics, metric = out["metrics"], built.objective.metric
        for j, step, values in l2_points(metrics, metric):
            self.runs[self.names[j]].log(values, step=step)
        best = figures(metrics, metric, len(self.names))
        for name, values in zip(self.names, best, strict=True):
            self._summary(name, {f"best/{k}": v for k, v in values.items()})
        if ROOT not in self.names:  # a sweep: its run holds the selected configuration's
            self.runs[ROOT].config.update(hyperparameters(built, selected) | {"configuration": self.names[selected]})
            self._summary(ROOT, {f"best/{k}": v for k, v in best[selected].items()})
        self._outcome(out)

    def chosen(self, out: Packaged, candidates: list[Candidate], by: str) -> None:
        """`method: auto`'s job run: the candidate kept, each one's figures, the chosen model's evaluation and plots."""
        self._guard(lambda: self._chosen(out, candidates, by))

    def _chosen(self, out: Packaged, candidates: list[Candidate], by: str) -> None:
        if self.job is None:
            return
        kept = out["metrics"]["auto"]["selected"]
        self.runs[ROOT].config.update({"method": "auto", "auto.selected": kept, "auto.by": by})
        theirs = {
            f"{row['method']}/{name}": float(value)
            for row in candidates
            for name, value in row.items()
            if isinstance(value, int | float)
        }
        self._summary(ROOT, theirs)
        self._outcome(out)

    def _outcome(self, out: Packaged) -> None:
        """The job's run: the evaluation's figures in its summary, the plots as images."""
        import wandb
        from PIL import Image

        self._summary(ROOT, {f"evaluation/{k}": float(v) for k, v in out["evaluation"]["metrics"].items()})
        plots = out["plots"].items()
        if plots:
            self.runs[ROOT].log(
                {f"plots/{k}": wandb.Image(Image.open(io.BytesIO(png)).convert("RGB")) for k, png in plots}
            )

    def _summary(self, name: str, values: dict[str, float]) -> None:
        self.runs[name].summary.update({k: v for k, v in values.items() if finite(v)})

    def _close(self, error: BaseException | None) -> None:
        """Each run ended: finished, or failed (the job failed or was cancelled)."""
        while self.runs:
            _, run = self.runs.popitem()
            run.finish(exit_code=0 if error is None else 1)

    def _drop(self) -> None:
        """The runs not ended (tracking stopped) ended as failed, and W&B's state in this process reset: a service
        that died would otherwise fail every later job's runs in this worker."""
        runs, self.runs, self.job, self.names = self.runs, {}, None, []
        if not (self.halt.stopped and self.imported):
            return
        import wandb

        for run in runs.values():
            try:
                run.finish(exit_code=1)
            except Exception:  # a run that failed to log may fail to end: it is dropped anyway
                self.log.debug("ending a W&B run", exc_info=True)
        try:
            wandb.teardown()
        except Exception:  # a dead service fails its teardown, which resets W&B's state all the same
            self.log.debug("W&B's teardown", exc_info=True)
