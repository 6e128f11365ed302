"""A job's training, shared by every method and execution mode (`train_job`), in stages over typed values
(stages.py):

load_data -> Data        the cache entry, or the dataset and the frozen backbone (services/training/inputs.py)
split_data -> Split      the seeded, stratified train, validation and test indices
build -> Built           the model of every configuration of the sweep, their hyperparameters, the objective
prepare_inputs -> Inputs the training and validation sources of mini-batches
optimise -> Optimised    the loop (services/training/fit.py: each mini-batch read once for all configurations,
                         the best on validation kept), or the linear probe's L-BFGS protocol (probes.py)
select_model -> Selected the configuration that validation chose, as Runs
evaluate_model -> Report the selected model once on the test split (else on validation, named so)
package -> dict          weights, manifest, metrics, evaluation and plots for the artifact store (package.py)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from services import methods
from services.jobs.progress import Reporter
from services.jobs.resolved import ResolvedJob, training_split
from services.methods.readout import FeatureInfo
from services.spec import JobSpec
from services.spec.sweep import check_size
from services.training import evaluation, halving
from services.training.auto import train_auto
from services.training.fit import fit, predict, predicted_labels, select
from services.training.inputs import Data, load_data, report_loading, sources, test_source
from services.training.objectives import Objective
from services.training.package import package
from services.training.probes import solve_probes
from services.training.runs import Runs, to_numpy, to_torch  # noqa: F401 - to_numpy/to_torch: the tests' helpers
from services.training.stages import Built, Inputs, Optimised, Report, Selected, Split
from services.training.sweeps.stacked import make_runs
from storage.settings import Settings
from storage.store import Folder


def train_job(
    spec: JobSpec,
    settings: Settings,
    cache_key: str | None,
    reporter: Reporter,
    checkpoint_dir: Folder | Path,
    resolved: ResolvedJob | None = None,
) -> dict[str, Any]:
    """Build the job's model (one per configuration of its sweep) and input sources for its execution mode, train
    on the resolved job's split (drawn here without one), select on validation, evaluate the selected model once on
    the test split (else on validation, named so); returns {"weights", "manifest" (services/models/manifest.py),
    "metrics", "evaluation", "plots"} for the artifact store."""
    if spec.method.name == "auto":
        return train_auto(spec, settings, cache_key, reporter, checkpoint_dir, train_job, resolved)
    check_size(spec.grid(), settings.max_sweep_configs)
    data = load_data(spec, settings, cache_key, reporter)
    parts = split_data(spec, data, resolved, reporter)
    built = build(spec, settings, data, parts)
    inputs = prepare_inputs(spec, settings, data, parts, built, reporter)
    optimised = optimise(spec, data, parts, built, inputs, reporter, checkpoint_dir)
    report_loading(reporter, [inputs.train, inputs.val])
    selected = select_model(built, optimised, settings.torch_device())
    report = evaluate_model(spec, settings, data, parts, built, inputs, selected, reporter)
    return package(spec, cache_key, data, parts, built, optimised, selected, report)


def split_data(spec: JobSpec, data: Data, resolved: ResolvedJob | None, reporter: Reporter) -> Split:
    """The resolved job's split of the usable images (services/jobs/resolved.py), drawn here by the same rule
    without one."""
    ds = spec.dataset
    train, val, test = training_split(resolved, ds, data.labels, data.usable, data.classes, reporter)
    return Split(train, val, test, "test" if len(test) or ds.test else "val")


def build(spec: JobSpec, settings: Settings, data: Data, parts: Split) -> Built:
    """Every configuration's hyperparameters (resolved for the training split's size) and model, each initialised as
    it would be in a job of its own; the objective over the training labels."""
    device = settings.torch_device()
    configs = spec.configurations()
    hps = [c.training.resolved(c.method.training_defaults(), len(parts.train)) for c in configs]
    hp = hps[0]
    labels = data.labels[parts.train]
    objective = Objective(labels, len(data.classes), hp.label_smoothing, hp.class_weights, device)
    # every adapted configuration adapts its own copy of the backbone (copied before the first one changes it)
    side = type(spec.method).kind == "side"
    vits = (
        [None] * len(configs)
        if side
        else [data.backbone.model, *(copy.deepcopy(data.backbone.model) for _ in configs[1:])]
    )
    models = []
    for c, vit in zip(configs, vits, strict=True):
        torch.manual_seed(hp.seed)  # each configuration starts as it would in a job of its own
        models.append(_model(c, data, vit).to(device))
    layers = sorted({layer for m in models for layer in (m.input_layers or [])}) or None
    return Built(configs, hps, models, objective, layers)


def _model(spec: JobSpec, data: Data, vit: torch.nn.Module | None) -> torch.nn.Module:
    if type(spec.method).kind == "side":
        readout = data.entry.readout() if spec.mode == "cache" else data.backbone.readout_tensors()
        info = FeatureInfo.from_meta(data.meta, readout, len(data.classes), data.tokens)
        return methods.build(spec.method, info)
    tail = spec.execution.tail_blocks if spec.mode == "tail" else None
    return methods.build(spec.method, vit, len(data.classes), tail)


def prepare_inputs(
    spec: JobSpec, settings: Settings, data: Data, parts: Split, built: Built, reporter: Reporter
) -> Inputs:
    """The training and validation sources, then the event that announces the training (with the hyperparameters)."""
    (train, val), description = sources(spec, settings, data, [parts.train, parts.val], built.layers)
    if data.entry is not None:
        data.entry.touch()
    grid, hp = spec.grid(), built.hps[0]
    what = f"{len(built.configs)} configurations ({grid.describe()})" if grid else spec.method.name
    if spec.automatic_lrs():
        what += ", the learning rates chosen automatically" + (
            ", the lower half stopping at epochs " + ", ".join(map(str, halving.rungs(hp.epochs)))
            if hp.early_termination
            else ""
        )
    testing = f", testing on {len(parts.test)}" if len(parts.test) else ""
    reporter.event(
        f"training {what} in mode {spec.mode} ({built.models[0].side_parameters():,} side parameters) on "
        f"{len(parts.train)} images, validating on {len(parts.val)}{testing}; inputs: {description}",
        data={"hyperparameters": hp.model_dump()},
    )
    return Inputs(train, val, description)


def optimise(
    spec: JobSpec,
    data: Data,
    parts: Split,
    built: Built,
    inputs: Inputs,
    reporter: Reporter,
    checkpoint_dir: Folder | Path,
) -> Optimised:
    """The linear probe in cache mode: solved by L-BFGS along its L2 path (probes.py); every other job: the loop."""
    y_train, y_val = data.labels[parts.train], data.labels[parts.val]
    objective = built.objective
    if spec.linear_solver == "lbfgs":
        results, points, timing, held = solve_probes(
            spec,
            built.configs,
            built.hps,
            built.models,
            [inputs.train, inputs.val],
            [y_train, y_val],
            objective,
            reporter,
            held_out=objective.multi_label or parts.report_on == "val",
        )
        return Optimised(results, timing, [p["config"] for p in points], points, held)
    methods_ = [c.method.model_dump() for c in built.configs]
    runs, where = make_runs(built.models, methods_, built.hps, objective, objective.device)
    hp, layers = built.hps[0], built.layers
    results, timing = fit(
        runs, where, inputs.train, inputs.val, len(y_train), len(y_val), hp, objective, reporter, checkpoint_dir, layers
    )
    return Optimised(results, timing, list(range(len(built.configs))))


def select_model(built: Built, optimised: Optimised, device: str) -> Selected:
    """The best result on validation (of those with weights: an L-BFGS path keeps its best point's only), its model
    with those weights, and the Runs that validation judges."""
    results = optimised.results
    kept = [i for i, r in enumerate(results) if r.state]
    chosen = kept[select([results[i] for i in kept])]
    j = optimised.owner[chosen]
    best, hp, model, res = built.configs[j], built.hps[j], built.models[j], results[chosen]
    if optimised.points is not None:  # the grid's strength, as the sweep names it (the refit's is in metrics)
        hp = hp.model_copy(update={"weight_decay": optimised.points[chosen]["weight_decay"]})
    model.load_trainable(to_torch(res.state))
    method = [best.method.model_dump()]
    final = make_runs([model], method, [hp], built.objective, device)[0]
    # what validation judges has not seen the validation images: the L-BFGS probe's saved model is refitted on them,
    # so the multi-label threshold and a report on validation come from its fit on the training split alone
    judge = final
    if optimised.held_state is not None:
        judged = copy.deepcopy(model)
        judged.load_trainable(to_torch(optimised.held_state))
        judge = make_runs([judged], method, [hp], built.objective, device)[0]
        optimised.timing["refit"]["validation_judged_by"] = "the fit on the training split at the chosen strength"
    return Selected(chosen, j, best, hp, model, res, final, judge)


def evaluate_model(
    spec: JobSpec,
    settings: Settings,
    data: Data,
    parts: Split,
    built: Built,
    inputs: Inputs,
    selected: Selected,
    reporter: Reporter,
) -> Report:
    """The selected model, once: the multi-label threshold on validation, the report on the test split (a separate
    test set, else the test split, else validation)."""
    objective, layers, device = built.objective, built.layers, settings.torch_device()
    y_val = data.labels[parts.val]
    threshold = None
    if objective.multi_label:
        logits, targets = predict(selected.judge, inputs.val, len(y_val), 256, layers, device)
        threshold = evaluation.choose_threshold(targets, objective.probabilities(logits[0]))
    own = selected.model.input_layers
    if spec.dataset.test:
        source, targets = test_source(spec, settings, data, own)
    elif len(parts.test):
        source, targets = sources(spec, settings, data, [parts.test], own, train=False)[0][0], data.labels[parts.test]
    else:
        source, targets = inputs.val, y_val
    on_val = source is inputs.val
    read, scored, name = layers if on_val else own, selected.judge if on_val else selected.final, parts.report_on
    if objective.multi_label:
        logits, targets = predict(scored, source, len(targets), 256, read, device)
        report = evaluation.report(targets, objective.probabilities(logits[0]), data.classes, name, threshold)
    else:  # batch by batch: never the [n, C] probabilities whole
        targets, pred, top5 = predicted_labels(scored, source, len(targets), 256, read, objective)
        report = evaluation.label_report(targets, pred, top5, data.classes, name)
    reporter.event(
        f"selected model on the {'test' if name == 'test' else 'validation'} split: "
        + ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items()),
        type="metrics",
        data=report["metrics"],
    )
    return Report(report, name, int(len(targets)), threshold)
