"""`method: auto` (services/methods/auto.py) trained: the linear probe, then LoSA, each a job of its own with every
setting default (the job's dataset, backbone, extraction and training fields kept) from the same feature cache, each
with its own checkpoint folder (a killed train worker resumes LoSA from its last epoch); the better on validation is
the job's model. The probe's validation figure is its cross-validated score over the training and validation images
(or the validation split's, for large jobs), LoSA's its best epoch's on the validation split: the figures each
method's own selection used. A tie keeps the probe, the cheaper model. Both are reported on the test split, which
no choice reads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from services.jobs.progress import Reporter
from services.jobs.resolved import ResolvedJob
from services.spec import JobSpec
from services.training.metrics import Candidate
from services.training.mlflow_runs import MlflowJob, MlflowRuns
from services.training.package import Packaged
from services.training.wandb_logger import WandbJob, WandbRuns
from storage.artifacts import as_folder
from storage.settings import Settings
from storage.store import Folder

# services/training/job.py: train_job, which trains each candidate as a job of its own; passed in by it, which
# dispatches `method: auto` here, so neither module imports the other
TrainJob = Callable[
    [
        JobSpec,
        Settings,
        str | None,
        Reporter,
        Folder,
        ResolvedJob | None,
        Folder | None,
        MlflowJob | None,
        WandbJob | None,
    ],
    Packaged,
]


def train_auto(
    spec: JobSpec,
    settings: Settings,
    cache_key: str | None,
    reporter: Reporter,
    checkpoint_dir: Folder | Path,
    train_job: TrainJob,
    resolved: ResolvedJob | None = None,
    tensorboard: Folder | Path | None = None,
    mlflow: MlflowJob | None = None,
    wandb: WandbJob | None = None,
) -> Packaged:
    """Each candidate as a job of its own (its checkpoints and TensorBoard runs in a folder named by its method, its
    MLflow runs nested in the job's, its W&B runs in the job's group); the better on validation is the job's model."""
    base = spec.model_dump()
    with MlflowRuns.open(mlflow, None, reporter) as job_run, WandbRuns.open(wandb, None, reporter) as group:
        outs = []
        for method in spec.method.candidates():
            candidate = JobSpec.model_validate({**base, "method": method})
            reporter.event(f"method auto: training {method['name']} from the feature cache")
            folder = as_folder(checkpoint_dir).child(method["name"])
            runs = as_folder(tensorboard).child(method["name"]) if tensorboard is not None else None
            nested, grouped = job_run.candidate(method["name"]), group.candidate(method["name"])
            # one split for both (`resolved`)
            outs.append(train_job(candidate, settings, cache_key, reporter, folder, resolved, runs, nested, grouped))
        chosen, rows, metric = choose(outs, reporter)
        job_run.chosen(chosen, rows, metric)
        group.chosen(chosen, rows, metric)
    return chosen


def choose(outs: list[Packaged], reporter: Reporter) -> tuple[Packaged, list[Candidate], str]:
    """The better candidate on validation (its metrics say so), each candidate's figures, and the figure that chose."""
    metric = "val_map" if outs[0]["manifest"].multi_label else "val_accuracy"
    test = metric.replace("val_", "test_")
    best = max(range(len(outs)), key=lambda i: (outs[i]["metrics"][metric], -i))  # a tie: the earlier (the probe)
    rows: list[Candidate] = [
        {
            "method": out["manifest"].method.name,
            metric: out["metrics"][metric],
            **({test: out["metrics"][test]} if test in out["metrics"] else {}),
            "train_seconds": out["metrics"]["train_seconds"],
        }
        for out in outs
    ]
    chosen = outs[best]
    seconds = round(sum(r["train_seconds"] for r in rows), 3)
    reporter.event(
        f"method auto: {rows[best]['method']} kept ("
        + ", ".join(f"{r['method']} {metric.replace('_', ' ')} {r[metric]:.4f}" for r in rows)
        + ")",
        data={"candidates": rows},
    )
    chosen["metrics"] = {
        **chosen["metrics"],
        "train_seconds": seconds,
        "auto": {"selected": rows[best]["method"], "by": metric, "candidates": rows},
    }
    return chosen, rows, metric
