"""A job's training, shared by every method and execution mode (`train_job`), in stages over typed values
(stages.py). `train_job` hands each stage what it reads of the spec: how the inputs are read (`Reading`, inputs.py),
the dataset's split settings, the configurations (`Grid`), the L-BFGS probe's protocol (`L2Search`, probes.py):

load_data -> Data        the cache entry, or the dataset and the frozen backbone (services/training/inputs.py)
split_data -> Split      the seeded, stratified train, validation and test indices
build -> Built           the model of every configuration of the sweep, their hyperparameters, the objective
prepare_inputs -> Inputs the training and validation sources of mini-batches
optimise -> Optimised    the loop (services/training/fit.py: each mini-batch read once for all configurations,
                         the best on validation kept), or the linear probe's L-BFGS protocol (probes.py)
select_model -> Selected the configuration that validation chose, as Runs
evaluate_model -> Report the selected model once on the test split (else on validation, named so)
package -> Packaged      weights, manifest, metrics, evaluation and plots for the artifact store (package.py)
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from services import methods
from services.jobs.progress import Reporter
from services.jobs.resolved import ResolvedJob, training_split
from services.methods import MethodConfig
from services.methods.readout import FeatureInfo
from services.spec import DatasetSpec, JobSpec
from services.spec.sweep import check_size
from services.training import evaluation, halving
from services.training.auto import train_auto
from services.training.fit import fit, predict, predicted_labels, select
from services.training.inputs import Data, Reading, load_data, report_loading, sources, test_source
from services.training.mlflow_runs import MlflowJob, MlflowRuns
from services.training.objectives import Objective
from services.training.package import Packaged, package
from services.training.probes import L2Search, solve_probes
from services.training.runs import Runs, to_numpy, to_torch  # noqa: F401 - to_numpy/to_torch: the tests' helpers
from services.training.stages import Built, Grid, Inputs, Optimised, Report, Selected, Split
from services.training.sweeps.stacked import make_runs
from services.training.tensorboard import Board
from services.training.tracking import Tracker, Trackers
from services.training.wandb_logger import WandbJob, WandbRuns
from storage.settings import Settings
from storage.store import Folder


def train_job(
    spec: JobSpec,
    settings: Settings,
    cache_key: str | None,
    reporter: Reporter,
    checkpoint_dir: Folder | Path,
    resolved: ResolvedJob | None = None,
    tensorboard: Folder | Path | None = None,
    mlflow: MlflowJob | None = None,
    wandb: WandbJob | None = None,
) -> Packaged:
    """Build the job's model (one per configuration of its sweep) and input sources for its execution mode, train
    on the resolved job's split (drawn here without one), select on validation, evaluate the selected model once on
    the test split (else on validation, named so); returns its weights, manifest (services/models/manifest.py),
    metrics, evaluation and plots for the artifact store. With `tensorboard`, the job's TensorBoard runs are written
    there as it trains (services/training/tensorboard.py); with `mlflow`, its runs go to that MLflow server
    (services/training/mlflow_runs.py); with `wandb`, to that W&B project (services/training/wandb_logger.py)."""
    if spec.method.name == "auto":
        return train_auto(
            spec, settings, cache_key, reporter, checkpoint_dir, train_job, resolved, tensorboard, mlflow, wandb
        )
    check_size(spec.grid(), settings.max_sweep_configs)
    reading, device, grid = Reading.of(spec), settings.torch_device(), Grid.of(spec)
    trackers = [
        Board.open(tensorboard, grid, reporter),
        MlflowRuns.open(mlflow, grid, reporter),
        WandbRuns.open(wandb, grid, reporter),
    ]
    with Trackers(reporter, trackers) as tracker:
        data = load_data(reading, settings, cache_key, reporter)
        parts = split_data(spec.dataset, data, resolved, reporter)
        built = build(grid, reading.tail_blocks, data, parts, device)
        tracker.begin(built)
        inputs = prepare_inputs(reading, settings, data, parts, built, reporter)
        search = L2Search.of(spec) if spec.linear_solver == "lbfgs" else None
        optimised = optimise(search, data, parts, built, inputs, reporter, checkpoint_dir, tracker)
        report_loading(reporter, [inputs.train, inputs.val])
        selected = select_model(built, optimised, device)
        report = evaluate_model(reading, settings, data, parts, built, inputs, selected, reporter)
        out = package(reading, cache_key, data, parts, built, optimised, selected, report)
        tracker.finish(built, selected.config, out)
    return out


def split_data(dataset: DatasetSpec, data: Data, resolved: ResolvedJob | None, reporter: Reporter) -> Split:
    """The resolved job's split of the usable images (services/jobs/resolved.py), drawn here by the same rule
    without one."""
    train, val, test = training_split(resolved, dataset, data.labels, data.usable, data.classes, reporter)
    return Split(train, val, test, "test" if len(test) or dataset.test else "val")


def build(grid: Grid, tail_blocks: int | None, data: Data, parts: Split, device: str) -> Built:
    """Every configuration's hyperparameters (resolved for the training split's size) and model, each initialised as
    it would be in a job of its own (`tail_blocks`: the blocks adapted in tail mode); the objective over the training
    labels."""
    pairs = zip(grid.methods, grid.trainings, strict=True)
    hps = [training.resolved(method.training_defaults(), len(parts.train)) for method, training in pairs]
    hp = hps[0]
    labels = data.labels[parts.train]
    objective = Objective(labels, len(data.classes), hp.label_smoothing, hp.class_weights, device)
    # every adapted configuration adapts its own copy of the backbone (copied before the first one changes it)
    vits = (
        [None] * len(hps)
        if grid.kind == "side"
        else [data.backbone.model, *(copy.deepcopy(data.backbone.model) for _ in hps[1:])]
    )
    models = []
    for method, vit in zip(grid.methods, vits, strict=True):
        torch.manual_seed(hp.seed)  # each configuration starts as it would in a job of its own
        models.append(_model(method, data, vit, tail_blocks).to(device))
    layers = sorted({layer for m in models for layer in (m.input_layers or [])}) or None
    return Built(grid, hps, models, objective, layers)


def _model(method: MethodConfig, data: Data, vit: torch.nn.Module | None, tail_blocks: int | None) -> torch.nn.Module:
    if type(method).kind == "side":  # from the cache entry's readout norms (cache mode), else the backbone's
        readout = data.entry.readout() if data.entry is not None else data.backbone.readout_tensors()
        info = FeatureInfo.from_meta(data.meta, readout, len(data.classes), data.tokens)
        return methods.build(method, info)
    return methods.build(method, vit, len(data.classes), tail_blocks)


def prepare_inputs(
    reading: Reading, settings: Settings, data: Data, parts: Split, built: Built, reporter: Reporter
) -> Inputs:
    """The training and validation sources, then the event that announces the training (with the hyperparameters)."""
    (train, val), description = sources(reading, settings, data, [parts.train, parts.val], built.layers)
    if data.entry is not None:
        data.entry.touch()
    grid, hp = built.grid, built.hps[0]
    what = f"{len(grid.methods)} configurations ({grid.sweep.describe()})" if grid.sweep else grid.methods[0].name
    if grid.automatic_lr:
        what += ", the learning rates chosen automatically" + (
            ", the lower half stopping at epochs " + ", ".join(map(str, halving.rungs(hp.epochs)))
            if hp.early_termination
            else ""
        )
    testing = f", testing on {len(parts.test)}" if len(parts.test) else ""
    reporter.event(
        f"training {what} in mode {reading.mode} ({built.models[0].side_parameters():,} side parameters) on "
        f"{len(parts.train)} images, validating on {len(parts.val)}{testing}; inputs: {description}",
        data={"hyperparameters": hp.model_dump()},
    )
    return Inputs(train, val, description)


def optimise(
    search: L2Search | None,
    data: Data,
    parts: Split,
    built: Built,
    inputs: Inputs,
    reporter: Reporter,
    checkpoint_dir: Folder | Path,
    tracker: Tracker | None = None,
) -> Optimised:
    """The linear probe in cache mode (`search`): solved by L-BFGS along its L2 path (probes.py; `tracker` takes its
    path at the end); every other job: the loop, which feeds `tracker` every epoch."""
    y_train, y_val = data.labels[parts.train], data.labels[parts.val]
    objective = built.objective
    if search is not None:
        return solve_probes(
            search,
            built.grid.methods,
            built.hps,
            built.models,
            [inputs.train, inputs.val],
            [y_train, y_val],
            objective,
            reporter,
            held_out=objective.multi_label or parts.report_on == "val",
        )
    runs, where = make_runs(built.models, built.grid.methods, built.hps, objective, objective.device)
    hp, layers = built.hps[0], built.layers
    results, timing = fit(
        runs,
        where,
        inputs.train,
        inputs.val,
        len(y_train),
        len(y_val),
        hp,
        objective,
        reporter,
        checkpoint_dir,
        layers,
        tracker,
    )
    return Optimised(results, timing, list(range(len(built.hps))))


def select_model(built: Built, optimised: Optimised, device: str) -> Selected:
    """The best result on validation (of those with weights: an L-BFGS path keeps its best point's only), its model
    with those weights, and the Runs that validation judges."""
    results = optimised.results
    kept = [i for i, r in enumerate(results) if r.state]
    chosen = kept[select([results[i] for i in kept])]
    j = optimised.owner[chosen]
    best, hp, model, res = built.grid.methods[j], built.hps[j], built.models[j], results[chosen]
    if optimised.points is not None:  # the grid's strength, as the sweep names it (the refit's is in metrics)
        hp = hp.model_copy(update={"weight_decay": optimised.points[chosen]["weight_decay"]})
    model.load_trainable(to_torch(res.state))
    final = make_runs([model], [best], [hp], built.objective, device)[0]
    # what validation judges has not seen the validation images: the L-BFGS probe's saved model is refitted on them,
    # so the multi-label threshold and a report on validation come from its fit on the training split alone
    judge = final
    if optimised.held_state is not None:
        judged = copy.deepcopy(model)
        judged.load_trainable(to_torch(optimised.held_state))
        judge = make_runs([judged], [best], [hp], built.objective, device)[0]
        optimised.timing["refit"]["validation_judged_by"] = "the fit on the training split at the chosen strength"
    return Selected(chosen, j, best, hp, model, res, final, judge)


def evaluate_model(
    reading: Reading,
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
    if reading.dataset.test:
        source, targets = test_source(reading, settings, data, own)
    elif len(parts.test):
        source, targets = (
            sources(reading, settings, data, [parts.test], own, train=False)[0][0],
            data.labels[parts.test],
        )
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
