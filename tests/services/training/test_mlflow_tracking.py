"""A job's MLflow runs (services/training/mlflow_runs.py), read back from a real `mlflow server` through its REST API
(tests/mlflow_server.py): the job's run with its tags, params, per-epoch metrics, evaluation and artifacts; a nested
run per configuration of a sweep and per candidate of `method: auto`; each epoch once after a resume (the earlier
try's runs deleted); a server that goes away mid-job stops tracking with one event, and the job succeeds; figures
that are not finite are left out (and TensorBoard's writer no longer warns of them)."""

from __future__ import annotations

import json
import logging
import math
import uuid
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from services.extraction import run_extraction
from services.jobs.progress import Cancelled, NullReporter
from services.spec import JobSpec
from services.training.job import train_job
from services.training.mlflow_runs import MlflowJob, MlflowRuns
from services.training.stages import Grid
from services.training.state import LoopState
from services.training.tensorboard import Board
from services.training.tracking import run_names
from storage.settings import Settings
from tests.mlflow_server import MlflowServer, Rest
from tests.services.training.test_sweeps import CancelAtEpoch
from tests.tcp_proxy import TcpProxy

FIELDS = {"train/loss": "train_loss", "val/accuracy": "val_accuracy", "val/loss": "val_loss", "train/lr": "lr"}
EXPERIMENT = "sidetune-tests"


def spec(path: Path, method: dict | None = None, sweep: dict | None = None, **training) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "digits",
            "dataset": {"path": str(path), "test_fraction": 0.2},
            "backbone": {"name": "test_vit", "pretrained": False},
            "method": method or {"name": "losa", "rank": 4},
            "extraction": {"batch_size": 32},
            "training": {"epochs": 3, "batch_size": 32, "lr": 0.05, **training},  # not LoSA's automatic grid
            **({"sweep": sweep} if sweep is not None else {}),
        }
    )


def target(url: str) -> MlflowJob:
    """A fresh job's MLflow runs on the server at `url`."""
    job_id = f"job_{uuid.uuid4().hex[:12]}"
    return MlflowJob(url, EXPERIMENT, job_id, f"model_{job_id[4:]}", "digits", "owner-hash")


@pytest.fixture(scope="module")
def cache(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, str]:
    data = tmp_path_factory.mktemp("mlflow_cache")
    settings = Settings(data_dir=data, allowed_roots=[digits_root], device="cpu")
    return settings, run_extraction(spec(digits_root / "train"), settings, NullReporter())["cache_key"]


@pytest.fixture(scope="module")
def rest(mlflow_server: MlflowServer) -> Rest:
    return Rest(mlflow_server.url)


def check_curve(rest: Rest, run_id: str, history: list[dict]) -> None:
    for key, field in FIELDS.items():
        assert rest.history(run_id, key) == [(r["epoch"], pytest.approx(r[field], rel=1e-6)) for r in history], key


def by_name(runs: list[dict]) -> dict[str, dict]:
    return {r["info"]["run_name"]: r for r in runs}


@pytest.mark.parametrize("sweep", [None, {"lr": [0.01, 0.05]}], ids=["one-configuration", "sweep"])
def test_a_job_logs_its_run(
    cache: tuple[Settings, str], digits_root: Path, tmp_path: Path, rest: Rest, mlflow_server: MlflowServer, sweep
) -> None:
    settings, key = cache
    job, where = spec(digits_root / "train", sweep=sweep), target(mlflow_server.url)
    reporter = NullReporter()
    out = train_job(job, settings, key, reporter, tmp_path / "ckpt", None, None, where)
    assert not [e for e in reporter.events if "tracking stopped" in e["message"]]
    runs = by_name(rest.runs(EXPERIMENT, where.job_id))
    root = runs.pop("digits")
    assert f"tracking in MLflow: run {root['info']['run_id']} of experiment {EXPERIMENT!r}" in [
        e["message"] for e in reporter.events
    ]
    assert root["info"]["status"] == "FINISHED"
    tags = root["tags"]
    assert (tags["sidetune.job_id"], tags["sidetune.model_id"]) == (where.job_id, where.model_id)
    assert tags["sidetune.owner"] == "owner-hash" and "mlflow.parentRunId" not in tags
    m, evaluation = out["metrics"], out["evaluation"]
    test = evaluation["metrics"]["test_accuracy"]
    assert rest.history(root["info"]["run_id"], "test_accuracy") == [(0, pytest.approx(test))]
    assert rest.artifacts(root["info"]["run_id"]) == [
        "evaluation.json",
        "metrics.json",
        "plots/confusion.png",
        "plots/curves.png",
    ]
    assert json.loads(rest.artifact(root["info"]["run_id"], "evaluation.json")) == json.loads(json.dumps(evaluation))
    assert rest.artifact(root["info"]["run_id"], "plots/confusion.png") == out["plots"]["confusion"]
    if sweep is None:
        assert not runs
        check_curve(rest, root["info"]["run_id"], m["history"])
        assert root["params"]["lr"] == str(job.training.lr) and root["params"]["method"] == "losa"
        assert root["params"]["method.rank"] == "4" and root["params"]["epochs"] == "3"
        assert root["metrics"]["val_accuracy"] == pytest.approx(m["val_accuracy"])
        return
    assert sorted(runs) == ["config_00-lr=0.01", "config_01-lr=0.05"]
    for name, entry in zip(sorted(runs), m["sweep"], strict=True):
        run = runs[name]
        assert run["tags"]["mlflow.parentRunId"] == root["info"]["run_id"], name
        assert run["info"]["status"] == "FINISHED" and run["params"]["lr"] == str(entry["config"]["lr"])
        check_curve(rest, run["info"]["run_id"], entry["history"])
        assert run["metrics"]["val_accuracy"] == pytest.approx(entry["val_accuracy"])
        assert "test_accuracy" not in run["metrics"]  # the selected model's, on the job's run
    assert root["params"]["lr"] == str(m["selected"]["lr"]) and root["params"]["configuration"] in runs
    assert tags["sidetune.sweep"]


def test_method_auto_nests_each_candidates_runs(
    cache: tuple[Settings, str], digits_root: Path, tmp_path: Path, rest: Rest, mlflow_server: MlflowServer
) -> None:
    settings, key = cache
    where = target(mlflow_server.url)
    out = train_job(spec(digits_root / "train", method={"name": "auto"}, epochs=1), settings, key, NullReporter(),
                    tmp_path / "ckpt", None, None, where)  # fmt: skip
    runs = by_name(rest.runs(EXPERIMENT, where.job_id))
    assert sorted(runs) == ["digits", "linear", "losa"]
    root = runs["digits"]["info"]["run_id"]
    assert all(runs[c]["tags"]["mlflow.parentRunId"] == root for c in ("linear", "losa"))
    assert runs["digits"]["params"]["auto.selected"] == out["metrics"]["auto"]["selected"]
    assert "linear/val_accuracy" in runs["digits"]["metrics"] and "losa/val_accuracy" in runs["digits"]["metrics"]
    assert "plots/confusion.png" in rest.artifacts(root)
    assert rest.history(runs["linear"]["info"]["run_id"], "l2/val_accuracy")  # the probe's L2 path
    assert [s for s, _ in rest.history(runs["losa"]["info"]["run_id"], "train/loss")] == [1]
    assert {r["info"]["status"] for r in runs.values()} == {"FINISHED"}


def test_a_resumed_job_has_each_epoch_once(
    cache: tuple[Settings, str], digits_root: Path, tmp_path: Path, rest: Rest, mlflow_server: MlflowServer
) -> None:
    """The job is cancelled as its third epoch ends, its checkpoint and its run holding two (the run ends KILLED);
    the resumed job deletes that run and writes its own from the checkpoint's curves: each epoch once."""
    settings, key = cache
    job, where = spec(digits_root / "train"), target(mlflow_server.url)
    with pytest.raises(Cancelled):
        train_job(job, settings, key, CancelAtEpoch(3), tmp_path / "ckpt", None, None, where)
    [cut] = rest.runs(EXPERIMENT, where.job_id)
    assert cut["info"]["status"] == "KILLED"
    assert [s for s, _ in rest.history(cut["info"]["run_id"], "train/loss")] == [1, 2]
    reporter = NullReporter()
    out = train_job(job, settings, key, reporter, tmp_path / "ckpt", None, None, where)
    assert any("resumed training from the checkpoint" in e["message"] for e in reporter.events)
    [run] = rest.runs(EXPERIMENT, where.job_id)
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_id"] != cut["info"]["run_id"]
    check_curve(rest, run["info"]["run_id"], out["metrics"]["history"])
    assert [r["info"]["run_id"] for r in rest.runs(EXPERIMENT, where.job_id, deleted=True)] == [cut["info"]["run_id"]]


class StopAtEpoch(NullReporter):
    """Runs `stop` as epoch `epoch` is reported (the tracker's server goes away mid-job)."""

    def __init__(self, epoch: int, stop) -> None:
        super().__init__()
        self.epoch, self.stop = epoch, stop

    def progress(self, stage: str, done: int, total: int, **extra) -> None:
        if stage == "training" and done == self.epoch:
            self.stop()


def test_a_server_that_goes_away_mid_job_stops_tracking_not_the_job(
    cache: tuple[Settings, str], digits_root: Path, tmp_path: Path, rest: Rest, mlflow_server: MlflowServer
) -> None:
    """The server is reached through a proxy that is cut as the second epoch ends: the first epoch's figures were
    sent; the rest fail, tracking stops with one warning, and the job trains its three epochs and succeeds."""
    settings, key = cache
    proxy = TcpProxy(mlflow_server.port).start()
    try:
        where = target(proxy.url)
        reporter = StopAtEpoch(2, proxy.stop)
        out = train_job(spec(digits_root / "train"), settings, key, reporter, tmp_path / "ckpt", None, None, where)
    finally:
        proxy.stop()
    assert [r["epoch"] for r in out["metrics"]["history"]] == [1, 2, 3] and out["weights"]
    stopped = [e for e in reporter.events if "tracking stopped" in e["message"]]
    assert len(stopped) == 1 and stopped[0]["level"] == "warning", stopped
    assert stopped[0]["message"].startswith("MLflow tracking stopped (")
    [run] = rest.runs(EXPERIMENT, where.job_id)
    assert [s for s, _ in rest.history(run["info"]["run_id"], "train/loss")] == [1]
    assert run["info"]["status"] == "RUNNING"  # as a killed worker's: the next try of the job deletes it


def test_figures_that_are_not_finite_are_left_out(
    digits_root: Path, tmp_path: Path, rest: Rest, mlflow_server: MlflowServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A sweep whose second configuration diverged in its second epoch (its curve's row: NaN and infinite losses, as
    the loop records them): both trackers leave those figures out, and tensorboardX logs no "NaN or Inf found"."""
    grid = Grid.of(spec(digits_root / "train", sweep={"lr": [0.01, 0.05]}, epochs=2))
    fields = ["epoch", "train_loss", "val_accuracy", "val_loss", "lr", "train_seconds"]
    curves = np.array(
        [
            [[1, 2.1, 0.3, 2.0, 0.01, 0.1], [2, 1.9, 0.4, 1.8, 0.01, 0.1]],
            [[1, 2.2, 0.2, 2.1, 0.05, 0.1], [2, math.nan, math.nan, math.inf, 0.05, 0.1]],
        ]
    )
    state = LoopState([], [], [], [], curves, fields, epoch=2)
    where = target(mlflow_server.url)
    reporter = NullReporter()
    with caplog.at_level(logging.WARNING):
        for tracker in (Board.open(tmp_path / "tb", grid, reporter), MlflowRuns.open(where, grid, reporter)):
            with tracker:
                tracker.record(state)
    assert not [e for e in reporter.events if "tracking stopped" in e["message"]]
    assert not [r for r in caplog.records if "NaN or Inf" in r.getMessage()]
    runs = by_name(rest.runs(EXPERIMENT, where.job_id))
    for j, name in enumerate(run_names(grid)):
        acc = EventAccumulator(str(tmp_path / "tb" / name))
        acc.Reload()
        finite = [(e, v) for e, v in zip(curves[j, :, 0], curves[j, :, 1], strict=True) if math.isfinite(v)]
        assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("train/loss")] == finite
        assert rest.history(runs[name]["info"]["run_id"], "train/loss") == [(e, pytest.approx(v)) for e, v in finite]
        assert len(rest.history(runs[name]["info"]["run_id"], "val/loss")) == 2 - j
