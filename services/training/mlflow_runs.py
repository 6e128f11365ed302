"""A job's runs on an MLflow tracking server (`MlflowRuns`, one of its trackers: services/training/tracking.py), with
SIDETUNE_MLFLOW_TRACKING_URI (the `mlflow` extra; mlflow is imported here only, by the train worker, and only then):

    <job name or id>          the job's run, tagged `sidetune.job_id` and `sidetune.model_id` (and `sidetune.owner`):
                              a job of one configuration's hyperparameters (params) and curves; a sweep's selected
                              configuration's; the best figures and the evaluation's (metrics), and as artifacts
                              `evaluation.json`, `metrics.json` and the plots (`plots/confusion.png`, `curves.png`)
      config_00-lr=0.01       each configuration of a sweep, a nested run: its hyperparameters, curves, best figures
    `method: auto`            the job's run holds the chosen candidate's evaluation and plots and each candidate's
                              figure; each candidate is a nested run as above (`MlflowJob.candidate`)

Metrics are named as TensorBoard's scalars (tracking.py: `tag`): per epoch (the step) `train/loss`, `val/accuracy`
(or `val/map`), `val/loss`, `train/lr`, `train/seconds`; the L-BFGS probe's path `l2/...` (the step: the point's
place along it); at the end `val_accuracy`, `val_loss`, `best_epoch` and the evaluation's (`test_accuracy`, ...).
Values that are not finite are left out. They are sent in batches, at most every `SYNC_S` seconds and at the end, so
a sweep of short epochs does not wait on the server every epoch. The runs end FINISHED, FAILED or KILLED (cancelled)
with the job; a killed worker's stay RUNNING until the job resumes: the resumed job deletes the job's earlier runs
(into MLflow's trash) and writes them anew from its checkpoint's curves, as TensorBoard's files are, so each epoch is
there once.

MLflow's client retries a request 7 times with growing backoff: minutes before a job learns that the server is
down, at every epoch. Unless the operator set them, the train worker retries twice, 1 s apart, with a 10 s timeout
(`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, `MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`, `MLFLOW_HTTP_REQUEST_TIMEOUT`), and does not
print each run's address on stdout (the job's events name its run).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from services.jobs.progress import Cancelled, Reporter
from services.training import reports
from services.training.tracking import (
    ROOT,
    SYNC_S,
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
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from services.training.metrics import Candidate
    from services.training.package import Packaged
    from services.training.stages import Built, Grid
    from services.training.state import LoopState

PARENT = "mlflow.parentRunId"  # the tag that nests a run under another (MLflow's system tag)
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # a line on stdout per run ended; the job's event names its run
}
BATCH = 1000  # MLflow's most metrics in one log_batch
PARAMS_BATCH = 100  # and params
PARAM_CHARS = 6000  # the longest param value it keeps (a long class_weights list is cut)


@dataclass(frozen=True)
class MlflowJob:
    """Where a job's runs go, and what links them back to it; a candidate of `method: auto` nests under the job's
    run (`parent`). The job's trackers share `halt`."""

    uri: str
    experiment: str
    job_id: str
    model_id: str
    name: str | None = None
    owner: str | None = None
    parent: str | None = None
    candidate: str | None = None
    halt: Halt = field(default_factory=Halt, compare=False, repr=False)

    @classmethod
    def of(
        cls, settings: Settings, job_id: str, model_id: str, name: str | None, owner: str | None
    ) -> MlflowJob | None:
        """The job's MLflow runs, where a tracking URI is set."""
        if not settings.mlflow_tracking_uri:
            return None
        return cls(settings.mlflow_tracking_uri, settings.mlflow_experiment, job_id, model_id, name, owner)

    def candidate_of(self, run_id: str, method: str) -> MlflowJob:
        return replace(self, parent=run_id, candidate=method)

    @property
    def run_name(self) -> str:
        return self.candidate or self.name or self.job_id

    def tags(self) -> dict[str, str]:
        """The root run's: the job's ids (a candidate's: the job's, its method and its parent)."""
        if self.parent is not None:
            return {"sidetune.job_id": self.job_id, "sidetune.candidate": self.candidate or "", PARENT: self.parent}
        tags = {"sidetune.job_id": self.job_id, "sidetune.model_id": self.model_id}
        return tags | ({"sidetune.owner": self.owner} if self.owner else {})


def connect(uri: str) -> MlflowClient:
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created if missing (by another worker meanwhile: then its)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def forget_earlier(client: MlflowClient, experiment: str, job_id: str) -> None:
    """Delete the runs that an earlier try of the job wrote (a killed worker's: the job resumes and writes anew)."""
    quoted = job_id.replace("\\", "\\\\").replace("'", "\\'")
    for run in client.search_runs([experiment], f"tags.`sidetune.job_id` = '{quoted}'", max_results=1000):
        client.delete_run(run.info.run_id)


class MlflowRuns(Tracker):
    """A job's runs on an MLflow server: its run (`root`) and, in a sweep, a nested run per configuration (`ids`);
    without a server (`job` None), a tracker that writes nothing."""

    what = "MLflow"

    def __init__(self, reporter: Reporter, halt: Halt | None = None) -> None:
        super().__init__(reporter, halt)
        self.client: MlflowClient | None = None  # None: writes nothing
        self.job: MlflowJob | None = None
        self.root = ""
        self.names: list[str] = []
        self.ids: list[str] = []  # each configuration's run (a job of one: the root)
        self.written: list[int] = []  # each configuration's epochs sent
        self.pending: dict[str, list[Metric]] = {}
        self.synced_at = -math.inf

    @classmethod
    def open(cls, job: MlflowJob | None, grid: Grid | None, reporter: Reporter) -> MlflowRuns:
        """The runs of a job (`grid`: its configurations; None: the job's run alone, its candidates' parent)."""
        runs = cls(reporter, job.halt if job is not None else None)
        if job is not None:
            runs._guard(lambda: runs._start(job, grid))
        return runs

    def _start(self, job: MlflowJob, grid: Grid | None) -> None:
        client = connect(job.uri)
        experiment = experiment_id(client, job.experiment)
        if job.parent is None:
            forget_earlier(client, experiment, job.job_id)
        names = run_names(grid) if grid is not None else [ROOT]
        tags = job.tags() | ({"sidetune.sweep": grid.sweep.describe()} if grid and grid.sweep else {})
        root = client.create_run(experiment, tags=tags, run_name=job.run_name).info.run_id
        self.client, self.job, self.root, self.names = client, job, root, names
        self.ids = [
            root
            if name == ROOT
            else client.create_run(
                experiment,
                tags={"sidetune.job_id": job.job_id, "sidetune.configuration": str(j), PARENT: root},
                run_name=name,
            ).info.run_id
            for j, name in enumerate(names)
        ]
        self.written = [0] * len(names)
        if job.parent is None:
            self.reporter.event(f"tracking in MLflow: run {root} of experiment {job.experiment!r}")

    def candidate(self, method: str) -> MlflowJob | None:
        """Where a candidate of `method: auto` writes its runs: nested in the job's (None: tracking stopped)."""
        if self.client is None or self.job is None:
            return None
        return self.job.candidate_of(self.root, method)

    # ---- what it writes -------------------------------------------------------------------------------------------
    def _begin(self, built: Built) -> None:
        if self.client is None:
            return
        for j, run in enumerate(self.ids):
            self._params(run, hyperparameters(built, j))

    def _record(self, state: LoopState) -> None:
        if self.client is None:
            return
        for j, step, values in new_epochs(state, self.written):
            for name, value in values.items():
                self._metric(self.ids[j], name, value, step)
        self._flush(force=False)

    def _finish(self, built: Built, selected: int, out: Packaged) -> None:
        if self.client is None:
            return
        metrics, metric = out["metrics"], built.objective.metric
        best = figures(metrics, metric, len(self.ids))
        for j, step, values in l2_points(metrics, metric):
            for name, value in values.items():
                self._metric(self.ids[j], name, value, step)
        for run, values in zip(self.ids, best, strict=True):
            if run != self.root:
                self._figures(run, values)
        if ROOT not in self.names:  # a sweep: its run holds the selected configuration's
            self._params(self.root, hyperparameters(built, selected) | {"configuration": self.names[selected]})
        self._outcome(out, best[selected])

    def chosen(self, out: Packaged, candidates: list[Candidate], by: str) -> None:
        """`method: auto`'s job run: the candidate kept, each one's figures, the chosen model's evaluation and plots."""
        self._guard(lambda: self._chosen(out, candidates, by))

    def _chosen(self, out: Packaged, candidates: list[Candidate], by: str) -> None:
        if self.client is None:
            return
        kept = out["metrics"]["auto"]["selected"]
        self._params(self.root, {"method": "auto", "auto.selected": kept, "auto.by": by})
        theirs = {
            f"{row['method']}/{name}": float(value)
            for row in candidates
            for name, value in row.items()
            if isinstance(value, int | float)
        }
        self._outcome(out, theirs)

    def _outcome(self, out: Packaged, values: dict[str, float]) -> None:
        """The job's run: its figures and the evaluation's (which wins where they share a name: a report on the
        validation split), and its report, metrics and plots as its artifacts."""
        assert self.client is not None
        self._figures(self.root, values | {k: float(v) for k, v in out["evaluation"]["metrics"].items()})
        self._flush(force=True)
        with tempfile.TemporaryDirectory(prefix="sidetune-mlflow-") as tmp:
            folder = Path(tmp)
            (folder / "evaluation.json").write_bytes(reports.encode(out["evaluation"]))
            (folder / "metrics.json").write_text(json.dumps(out["metrics"], indent=1))
            (folder / "plots").mkdir()
            for name, png in out["plots"].items():
                (folder / "plots" / f"{name}.png").write_bytes(png)
            self.client.log_artifacts(self.root, tmp)

    def _close(self, error: BaseException | None) -> None:
        if self.client is None:
            return
        self._flush(force=True)
        status = "FINISHED" if error is None else "KILLED" if isinstance(error, Cancelled) else "FAILED"
        for run in dict.fromkeys([*self.ids, self.root]):
            self.client.set_terminated(run, status)

    def _drop(self) -> None:
        self.client, self.pending = None, {}

    # ---- sending --------------------------------------------------------------------------------------------------
    def _figures(self, run: str, values: dict[str, float]) -> None:
        """A run's figures of the whole job (step 0)."""
        for name, value in values.items():
            self._metric(run, name, value, 0)

    def _metric(self, run: str, name: str, value: float, step: int) -> None:
        from mlflow.entities import Metric

        if finite(value):
            self.pending.setdefault(run, []).append(Metric(name, value, int(time.time() * 1000), step))

    def _params(self, run: str, values: dict[str, HParam]) -> None:
        from mlflow.entities import Param

        assert self.client is not None
        params = [Param(k, str(v)[:PARAM_CHARS]) for k, v in values.items()]
        for i in range(0, len(params), PARAMS_BATCH):
            self.client.log_batch(run, params=params[i : i + PARAMS_BATCH])

    def _flush(self, force: bool) -> None:
        """The metrics pending, unless the last were sent under `SYNC_S` seconds ago (`force`: now). The first are
        sent at once: a job's first epoch shows as it ends."""
        if self.client is None or not self.pending or not (force or time.monotonic() - self.synced_at >= SYNC_S):
            return
        pending, self.pending = self.pending, {}
        for run, metrics in pending.items():
            for i in range(0, len(metrics), BATCH):
                self.client.log_batch(run, metrics=metrics[i : i + BATCH])
        self.synced_at = time.monotonic()
