"""The last stage of a job's training (services/training/job.py): what the artifact store saves of the selected model
(`package`): its weights, its manifest (what serving and export rebuild it from, services/models/manifest.py), the
job's metrics (the selection, the sweep, the timings, the test figures), the evaluation report and its plots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

from services.models.manifest import Manifest
from services.training.metrics import JobMetrics
from services.training.reports import EvaluationReport

if TYPE_CHECKING:
    import numpy as np

    from services.training.inputs import Data, Reading
    from services.training.stages import Built, Optimised, Report, Selected, Split

FEATURE_KEYS = ("num_layers", "dim", "num_prefix_tokens", "global_pool", "norm_eps")


class Packaged(TypedDict):
    """A job's model as the artifact store saves it (storage/artifacts.py: `save_model`): what `train_job` returns."""

    weights: dict[str, np.ndarray]  # the selected model's trainable state
    manifest: Manifest  # its `config.json`
    metrics: JobMetrics  # `metrics.json`
    evaluation: EvaluationReport  # `evaluation.json`
    plots: dict[str, bytes]  # `plots/<name>.png`


def package(
    reading: Reading,
    cache_key: str | None,
    data: Data,
    parts: Split,
    built: Built,
    optimised: Optimised,
    selected: Selected,
    report: Report,
) -> Packaged:
    """The selected model's weights, manifest (services/models/manifest.py), metrics, evaluation and plots for the
    artifact store."""
    from services.training import plots  # matplotlib: only once a job has a model to plot

    kind, model = built.grid.kind, selected.model
    job_metrics = metrics(data, parts, built, optimised, selected, report)
    manifest = Manifest(
        method=selected.method,
        kind=kind,
        mode=reading.mode,
        tail_blocks=reading.tail_blocks,
        backbone=reading.backbone,
        weights_hash=data.meta["weights_hash"],
        preprocessing=data.meta["data_config"],
        features={
            **{k: data.meta[k] for k in FEATURE_KEYS},
            "temporal": data.meta.get("temporal"),
            "tokens": data.meta["tokens"] if data.tokens == "all" else 1,
            "token_mode": data.tokens,
        },
        input_layers=model.input_layers if kind == "side" else None,
        input_tokens=data.tokens if kind == "side" else None,
        classes=data.classes,
        multi_label=built.objective.multi_label,
        threshold=report.threshold,
        hyperparameters=selected.hp.model_dump(),
        cache_key=cache_key if data.entry is not None else None,
    )
    return {
        "weights": selected.result.state,
        "manifest": manifest,
        "metrics": job_metrics,
        "evaluation": report.evaluation,
        "plots": plots.for_job(job_metrics, report.evaluation, built.objective.metric),
    }


def metrics(
    data: Data,
    parts: Split,
    built: Built,
    optimised: Optimised,
    selected: Selected,
    report: Report,
) -> JobMetrics:
    """The job's metrics: the selected configuration's validation figures, the sizes, the timings; the L-BFGS path
    or the loop's curve; every configuration of a sweep; the test split's figures."""
    metric, res, model, points = built.objective.metric, selected.result, selected.model, optimised.points
    out: JobMetrics = {
        metric: round(res.score, 5),
        "val_loss": round(res.loss, 5),
        "train_images": int(len(parts.train)),
        "val_images": int(len(parts.val)),
        "test_images": report.rows if report.split == "test" else 0,
        "skipped_rows": data.skipped_rows,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "side_params": model.side_parameters(),
        **optimised.timing,
    }
    if points is not None:
        out |= {
            "solver": "lbfgs",
            "weight_decay": selected.hp.weight_decay,
            "iterations": out["refit"]["iterations"],
            "l2_path": points,
        }
    else:
        out |= {"best_epoch": res.epoch, "epochs": built.hps[0].epochs, "history": res.history}
    if (grid := built.grid).sweep:
        overrides = grid.sweep.configurations()
        entries = [
            {
                "config": overrides[optimised.owner[i]],
                metric: round(r.score, 5),
                "val_loss": round(r.loss, 5),
                **(
                    {"weight_decay": points[i]["weight_decay"]}
                    if points is not None
                    else {"best_epoch": r.epoch, "history": r.history}
                ),
                **({"stopped_after_epoch": r.stopped} if r.stopped else {}),
            }
            for i, r in enumerate(optimised.results)
        ]
        out |= {"configurations": len(grid.methods), "selected": overrides[selected.config], "sweep": entries}
        if grid.automatic_lr:
            out["automatic_lr"] = grid.automatic_lr
    if report.split == "test":
        out |= report.evaluation["metrics"]
    return out
