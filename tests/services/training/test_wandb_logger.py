"""A job's W&B runs (services/training/wandb_logger.py) in W&B's offline mode (`WANDB_MODE=offline`, a temporary
WANDB_DIR), read back from the runs' own files (tests/wandb_runs.py: W&B's records, parsed by its own classes): real
jobs train, and each run holds its configuration's hyperparameters as config, its curves one history row per epoch,
its best figures and (the job's run) the evaluation in the summary, and the plots; a sweep has a run per
configuration besides the job's, `method: auto` a run per candidate besides the job's, all in the group named by the
job's id. A W&B whose service dies mid-job stops tracking with one event and the job succeeds (and the worker's next
job logs again); so does a W&B that is not installed, which no module imports until a job names a project."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import wandb

from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from services.training.job import train_job
from services.training.stages import Grid
from services.training.state import LoopState
from services.training.wandb_logger import WandbJob, WandbRuns
from storage.settings import Settings
from tests.services.training.test_mlflow_tracking import FIELDS, StopAtEpoch, spec
from tests.test_imports import modules
from tests.wandb_runs import OfflineRun, offline_runs

PROJECT = "sidetune-tests"
FIELDS_OF_A_CURVE = ["epoch", "train_loss", "val_accuracy", "val_loss", "lr", "train_seconds"]


@pytest.fixture(scope="module")
def cache(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, str]:
    data = tmp_path_factory.mktemp("wandb_cache")
    settings = Settings(data_dir=data, allowed_roots=[digits_root], device="cpu", wandb_project=PROJECT)
    return settings, run_extraction(spec(digits_root / "train"), settings, NullReporter())["cache_key"]


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """W&B offline, its files under a fresh WANDB_DIR. W&B reads its environment once per process (its setup): each
    test starts it anew, under its own variables."""
    folder = tmp_path / "wandb-dir"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    wandb.teardown()
    yield folder
    wandb.teardown()


def target(settings: Settings, job_id: str) -> WandbJob:
    where = WandbJob.of(settings, job_id, f"model_{job_id[4:]}", "digits", "owner-hash")
    assert where is not None and where.directory is None  # WANDB_DIR says where
    return where


def check_curve(run: OfflineRun, history: list[dict]) -> None:
    """One history row per epoch (the step), each curve's value as the job's metrics hold it."""
    rows = [r for r in run.history if "train/loss" in r]
    assert [r["_step"] for r in rows] == [row["epoch"] for row in history]
    for r, row in zip(rows, history, strict=True):
        for key, field in FIELDS.items():
            assert r[key] == pytest.approx(row[field], rel=1e-6), (key, r["_step"])


def check_outcome(root: OfflineRun, evaluation: dict) -> None:
    """The job's run: the evaluation in its summary, the plots as images."""
    assert root.summary["evaluation/test_accuracy"] == pytest.approx(evaluation["metrics"]["test_accuracy"])
    plots = next(r for r in root.history if "plots/confusion/_type" in r)  # an image's fields, flattened by W&B
    assert plots["plots/confusion/_type"] == plots["plots/curves/_type"] == "image-file"
    assert plots["plots/confusion/width"] > 100 and plots["plots/confusion/format"] == "png"


@pytest.mark.parametrize("sweep", [None, {"lr": [0.01, 0.05]}], ids=["one-configuration", "sweep"])
def test_a_job_logs_its_runs(
    cache: tuple[Settings, str], digits_root: Path, tmp_path: Path, offline: Path, sweep: dict | None
) -> None:
    settings, key = cache
    job, where = spec(digits_root / "train", sweep=sweep, epochs=2), target(settings, "job_w1")
    reporter = NullReporter()
    out = train_job(job, settings, key, reporter, tmp_path / "ckpt", None, None, None, where)
    messages = [e["message"] for e in reporter.events]
    assert f"tracking in W&B: group job_w1 of project {PROJECT!r}" in messages  # offline: no address
    assert not [m for m in messages if "tracking stopped" in m]
    m, runs = out["metrics"], offline_runs(offline)
    names = ["digits"] if sweep is None else ["digits", "digits/config_00-lr=0.01", "digits/config_01-lr=0.05"]
    assert sorted(runs) == names
    assert all(r.group == "job_w1" and r.exit_code == 0 and {"sidetune", "losa"} <= set(r.tags) for r in runs.values())
    assert all(
        (r.config["sidetune.job_id"], r.config["sidetune.model_id"]) == ("job_w1", "model_w1") for r in runs.values()
    )
    root = runs["digits"]
    assert root.job_type == "job" and root.config["sidetune.owner"] == "owner-hash"
    check_outcome(root, out["evaluation"])
    if sweep is None:
        check_curve(root, m["history"])
        assert root.config["lr"] == pytest.approx(job.training.lr) and root.config["method"] == "losa"
        assert root.config["method.rank"] == 4 and root.config["epochs"] == 2
        assert root.summary["best/val_accuracy"] == pytest.approx(m["val_accuracy"])
        return
    for j, (name, entry) in enumerate(zip(names[1:], m["sweep"], strict=True)):
        run = runs[name]
        assert run.job_type == "configuration" and run.config["sidetune.configuration"] == j
        check_curve(run, entry["history"])
        assert run.config["lr"] == pytest.approx(entry["config"]["lr"])
        assert run.summary["best/val_accuracy"] == pytest.approx(entry["val_accuracy"])
        assert "evaluation/test_accuracy" not in run.summary  # the selected model's, in the job's run
    assert not [r for r in root.history if "train/loss" in r]
    assert root.config["lr"] == pytest.approx(m["selected"]["lr"]) and f"digits/{root.config['configuration']}" in names
    assert root.config["sidetune.sweep"] and root.summary["best/val_accuracy"] == pytest.approx(m["val_accuracy"])


def test_method_auto_logs_each_candidates_runs(
    cache: tuple[Settings, str], digits_root: Path, tmp_path: Path, offline: Path
) -> None:
    settings, key = cache
    job = spec(digits_root / "train", method={"name": "auto"}, epochs=1)
    out = train_job(job, settings, key, NullReporter(), tmp_path / "ckpt", None, None, None, target(settings, "job_w2"))
    runs = offline_runs(offline)
    assert sorted(runs) == ["digits", "digits/linear", "digits/losa"]
    assert all(r.group == "job_w2" and r.exit_code == 0 for r in runs.values())
    root, linear, losa = runs["digits"], runs["digits/linear"], runs["digits/losa"]
    assert root.job_type == "job" and linear.job_type == losa.job_type == "candidate"
    assert linear.config["sidetune.candidate"] == "linear" and "auto" in root.tags
    assert root.config["auto.selected"] == out["metrics"]["auto"]["selected"]
    assert {"linear/val_accuracy", "losa/val_accuracy"} <= set(root.summary)
    check_outcome(root, out["evaluation"])
    assert any("l2/val_accuracy" in row for row in linear.history)  # the probe's L2 path
    assert [r["_step"] for r in losa.history if "train/loss" in r] == [1]
    assert "evaluation/test_accuracy" in losa.summary  # each candidate's own evaluation, as a job of its own


def kill_service() -> None:
    """W&B's service, the `wandb-core` process that this test's process started, dies."""
    alive = [p for p in psutil.Process().children() if p.status() != psutil.STATUS_ZOMBIE]
    [service] = [p for p in alive if p.name() == "wandb-core"]
    service.kill()
    service.wait(10)


def test_a_wandb_that_dies_mid_job_stops_tracking_not_the_job(
    cache: tuple[Settings, str], digits_root: Path, tmp_path: Path, offline: Path
) -> None:
    """W&B's service is killed as the second epoch ends: logging the second fails, tracking stops with one warning
    and the job succeeds. W&B's state is reset, so the process's next job logs again."""
    settings, key = cache
    reporter = StopAtEpoch(2, kill_service)
    job = spec(digits_root / "train", epochs=2)
    out = train_job(job, settings, key, reporter, tmp_path / "ckpt", None, None, None, target(settings, "job_w3"))
    assert [r["epoch"] for r in out["metrics"]["history"]] == [1, 2] and out["weights"]
    stopped = [e for e in reporter.events if "tracking stopped" in e["message"]]
    assert len(stopped) == 1 and stopped[0]["level"] == "warning", stopped
    assert stopped[0]["message"].startswith("W&B tracking stopped (")
    folder = tmp_path / "next"  # apart from the cut run's, which never ends
    folder.mkdir()
    with WandbRuns.open(replace(target(settings, "job_w4"), directory=str(folder)), Grid.of(job), reporter) as tracker:
        tracker.record(LoopState([], [], [], [], np.array([[[1, 2.1, 0.3, 2.0, 0.05, 0.1]]]), FIELDS_OF_A_CURVE, 1))
    assert len([e for e in reporter.events if "tracking stopped" in e["message"]]) == 1
    [run] = offline_runs(folder).values()
    assert [r["train/loss"] for r in run.history] == [2.1] and run.exit_code == 0


def test_a_wandb_not_installed_stops_tracking_not_the_job(digits_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a project set and wandb missing, the tracker stops as it opens (one event) and does nothing more."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    reporter = NullReporter()
    state = LoopState([], [], [], [], np.array([[[1, 2.1, 0.3, 2.0, 0.05, 0.1]]]), FIELDS_OF_A_CURVE, 1)
    where = WandbJob(PROJECT, "job_w5", "model_w5")
    with WandbRuns.open(where, Grid.of(spec(digits_root / "train")), reporter) as tracker:
        tracker.record(state)
    [stopped] = [e["message"] for e in reporter.events]
    assert stopped.startswith("W&B tracking stopped (ModuleNotFoundError: "), stopped


def test_wandb_is_imported_by_the_logger_alone_and_lazily() -> None:
    """No module needs wandb until a job names a project: only wandb_logger.py imports it, inside its functions (or
    for types only)."""
    found = []
    for module, path in modules().items():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}  # at import time (`if TYPE_CHECKING:` is a block of its own)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n.split(".")[0] == "wandb" for n in names):
                    found.append((module, id(node) in top))
    assert found and {m for m, _ in found} == {"services.training.wandb_logger"}
    assert not [m for m, at_import in found if at_import], found
