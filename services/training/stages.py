"""The typed values a job's training passes between its stages (services/training/job.py): the configurations it
trains (`Grid`, what the stages read of the spec's method, training and sweep), the split, the built configurations,
their inputs, what optimisation returned, the selected model and its report. `Data`, the first, lives with the code
that loads it, and `Reading`, what the stages read of the spec's dataset, backbone and execution, with the code that
reads the inputs (inputs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.data.sources import Source
from services.methods import MethodConfig
from services.spec import Hyperparameters, JobSpec, TrainingSpec
from services.spec.sweep import SweepSpec
from services.training.metrics import AutomaticLr, L2Point, Timing
from services.training.objectives import Objective
from services.training.reports import EvaluationReport
from services.training.runs import Runs
from services.training.state import Result


@dataclass(frozen=True)
class Grid:
    """The configurations a job trains (one without a sweep): each one's method config and training settings, the grid
    that made them (`sweep`, an automatic grid's learning rates included; None for one configuration) and an automatic
    grid's rates with the rule that made them."""

    methods: list[MethodConfig]
    trainings: list[TrainingSpec]
    sweep: SweepSpec | None
    automatic_lr: AutomaticLr | None

    @classmethod
    def of(cls, spec: JobSpec) -> Grid:
        configs = spec.configurations()
        lrs, automatic = spec.automatic_lrs(), None
        if lrs:
            d = spec.method.training_defaults()
            rule = f"{d['lr']} x sqrt(batch_size / {d['lr_reference_batch']}) x {', '.join(map(str, d['lr_grid']))}"
            automatic = AutomaticLr(lrs=lrs, rule=rule)
        return cls([c.method for c in configs], [c.training for c in configs], spec.grid(), automatic)

    @property
    def kind(self) -> str:
        """The methods' kind: "side" (trained on activations) or "adapted" (through the backbone)."""
        return type(self.methods[0]).kind


@dataclass(frozen=True)
class Split:
    """Indices of the usable images per split; `report_on`: the split the selected model is reported on."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    report_on: str  # "test" (a test split, or a separate test set) or "val"


@dataclass(frozen=True)
class Built:
    """Every configuration of the job (one without a sweep): its method config (in `grid`), resolved hyperparameters
    and model; the objective they share and the cached layers any of them reads."""

    grid: Grid
    hps: list[Hyperparameters]
    models: list[torch.nn.Module]
    objective: Objective
    layers: list[int] | None


@dataclass(frozen=True)
class Inputs:
    train: Source
    val: Source
    description: str  # where the inputs come from, for the job's events


@dataclass(frozen=True)
class Optimised:
    """One Result per trained configuration, or per scored L2 strength of the L-BFGS path (`points`, their figures;
    `owner[i]`: the configuration of result i); the timings; the L-BFGS probe's fit on the training split alone."""

    results: list[Result]
    timing: Timing
    owner: list[int]
    points: list[L2Point] | None = None
    held_state: dict[str, np.ndarray] | None = None


@dataclass(frozen=True)
class Selected:
    """The chosen result (`index`), its configuration (`config`, its method config `method`) and model with its
    weights loaded; `final`: it as Runs; `judge`: what validation may judge (the L-BFGS fit on the training split
    alone, else `final`)."""

    index: int
    config: int
    method: MethodConfig
    hp: Hyperparameters
    model: torch.nn.Module
    result: Result
    final: list[Runs]
    judge: list[Runs]


@dataclass(frozen=True)
class Report:
    """The selected model's evaluation (evaluation.report), the split it scored and how many rows, the multi-label
    decision threshold chosen on validation."""

    evaluation: EvaluationReport
    split: str
    rows: int
    threshold: float | None
