"""The last stage of a job's training (services/training/job.py): what the artifact store saves of the selected model
(`package`): its weights, its manifest (what serving and export rebuild it from, services/models/manifest.py), the
job's metrics (the selection, the sweep, the timings, the test figures), the evaluation report and its plots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from services.models.manifest import Manifest
from services.spec import JobSpec

if TYPE_CHECKING:
    from services.training.inputs import Data
    from services.training.stages import Built, Optimised, Report, Selected, Split

FEATURE_KEYS = ("num_layers", "dim", "num_prefix_tokens", "global_pool", "norm_eps")


def package(
    spec: JobSpec,
    cache_key: str | None,
    data: Data,
    parts: Split,
    built: Built,
    optimised: Optimised,
    selected: Selected,
    report: Report,
) -> dict[str, Any]:
    """{"weights", "manifest" (services/models/manifest.py), "metrics", "evaluation", "plots"} for the artifact
    store."""
    from services.training import plots  # matplotlib: only once a job has a model to plot

    kind, model = type(spec.method).kind, selected.model
    job_metrics = metrics(spec, data, parts, built, optimised, selected, report)
    manifest = Manifest(
        method=selected.spec.method,
        kind=kind,
        mode=spec.mode,
        tail_blocks=spec.execution.tail_blocks if spec.mode == "tail" else None,
        backbone=spec.backbone,
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
    spec: JobSpec,
    data: Data,
    parts: Split,
    built: Built,
    optimised: Optimised,
    selected: Selected,
    report: Report,
) -> dict[str, Any]:
    """The job's metrics: the selected configuration's validation figures, the sizes, the timings; the L-BFGS path
    or the loop's curve; every configuration of a sweep; the test split's figures."""
    metric, res, model, points = built.objective.metric, selected.result, selected.model, optimised.points
    out: dict[str, Any] = {
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
    if grid := spec.grid():
        overrides = grid.configurations()
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
        out |= {"configurations": len(built.configs), "selected": overrides[selected.config], "sweep": entries}
        if spec.automatic_lrs():
            d = spec.method.training_defaults()
            out["automatic_lr"] = {
                "lrs": spec.automatic_lrs(),
                "rule": f"{d['lr']} x sqrt(batch_size / "
                f"{d['lr_reference_batch']}) x {', '.join(map(str, d['lr_grid']))}",
            }
    if report.split == "test":
        out |= report.evaluation["metrics"]
    return out
