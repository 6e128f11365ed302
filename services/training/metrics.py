"""The job's metrics as it saves them (`metrics.json`, beside the model's weights; the model record's `metrics` and the
job's events show the same figures), and the figures they are made of: a curve's rows, the L-BFGS path's points, the
timings, a sweep's entries. TypedDicts, so a figure is still the dict that `json.dumps` writes as it always did.

The selecting figure is named by the objective: `val_accuracy` (single-label) or `val_map` (multi-label); the test
split's figures are the evaluation's (`test_accuracy`, `test_map`, ...: services/training/evaluation.py).
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

from services.spec.sweep import Overrides


class HistoryRow(TypedDict):
    """One epoch of a configuration's curve (services/training/state.py: `row`)."""

    epoch: int
    train_loss: float
    val_accuracy: NotRequired[float]  # or val_map: the selecting figure
    val_map: NotRequired[float]
    val_loss: float
    lr: float
    train_seconds: float


class L2Point(TypedDict):
    """A scored L2 strength of the L-BFGS linear probe's path (services/training/probes.py)."""

    config: int  # the configuration it belongs to
    pool: str
    weight_decay: float
    val_accuracy: NotRequired[float]  # or val_map
    val_map: NotRequired[float]
    val_loss: float
    cv_std: NotRequired[float]  # cross-validated: the folds' standard deviation
    iterations: int


class Selection(TypedDict):
    """How the L-BFGS probe's strength was chosen: by k-fold cross-validation, or on the validation split."""

    protocol: str  # "cross-validation" or "validation"
    folds: int
    images: int
    score: float
    std: NotRequired[float]
    fold_scores: NotRequired[list[float]]


class Refit(TypedDict):
    """The L-BFGS probe's refit at the chosen strength on every training and validation image."""

    images: int
    weight_decay: float
    iterations: int
    seconds: float
    validation_judged_by: NotRequired[str]  # a fit on the training split alone judges what validation reports


class EarlyTermination(TypedDict):
    """What successive halving saved (services/training/halving.py: `report`)."""

    rungs: list[int]
    stopped: int
    configuration_epochs: int
    configuration_epochs_without: int
    saved_fraction: float


class Timing(TypedDict):
    """How long the optimisation took: the loop's (services/training/fit.py) or the L-BFGS protocol's figures."""

    train_seconds: float
    train_images_per_s: float
    compiled: NotRequired[bool]  # the loop
    early_termination: NotRequired[EarlyTermination]
    first_step_seconds: NotRequired[float]
    peak_memory_mb: NotRequired[float]  # on a GPU
    selection: NotRequired[Selection]  # the L-BFGS probe
    refit: NotRequired[Refit]


class SweepEntry(TypedDict):
    """One configuration of a sweep: its overrides and best figures, its curve (the loop) or strength (L-BFGS)."""

    config: Overrides
    val_accuracy: NotRequired[float]  # or val_map
    val_map: NotRequired[float]
    val_loss: float
    weight_decay: NotRequired[float]
    best_epoch: NotRequired[int]
    history: NotRequired[list[HistoryRow]]
    stopped_after_epoch: NotRequired[int]


class AutomaticLr(TypedDict):
    """An automatic learning-rate grid (LoSA's `lr: auto`): its rates and the rule that made them."""

    lrs: list[float]
    rule: str


class Candidate(TypedDict):
    """A method that `method: auto` trained (services/training/auto.py)."""

    method: str
    val_accuracy: NotRequired[float]  # or val_map: the figure that chose
    val_map: NotRequired[float]
    test_accuracy: NotRequired[float]  # or test_map, where there is a test split
    test_map: NotRequired[float]
    train_seconds: float


class AutoChoice(TypedDict):
    selected: str
    by: str
    candidates: list[Candidate]


class JobMetrics(Timing):
    """`metrics.json`: the selected configuration's validation figures, the sizes and the timings; the L-BFGS path
    or the loop's curve; every configuration of a sweep; the test split's figures (services/training/package.py)."""

    val_accuracy: NotRequired[float]  # or val_map
    val_map: NotRequired[float]
    val_loss: float
    train_images: int
    val_images: int
    test_images: int
    skipped_rows: int
    trainable_params: int
    side_params: int
    # the L-BFGS probe
    solver: NotRequired[str]
    weight_decay: NotRequired[float]
    iterations: NotRequired[int]
    l2_path: NotRequired[list[L2Point]]
    # the loop
    best_epoch: NotRequired[int]
    epochs: NotRequired[int]
    history: NotRequired[list[HistoryRow]]
    # a sweep
    configurations: NotRequired[int]
    selected: NotRequired[Overrides]
    sweep: NotRequired[list[SweepEntry]]
    automatic_lr: NotRequired[AutomaticLr]
    # method: auto
    auto: NotRequired[AutoChoice]
    # the test split's (services/training/evaluation.py)
    test_accuracy: NotRequired[float]
    test_balanced_accuracy: NotRequired[float]
    test_macro_f1: NotRequired[float]
    test_top5_accuracy: NotRequired[float]
    test_map: NotRequired[float]
    test_micro_f1: NotRequired[float]
