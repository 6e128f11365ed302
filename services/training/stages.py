"""The typed values a job's training passes between its stages (services/training/job.py): the split, the built
configurations, their inputs, what optimisation returned, the selected model and its report. `Data`, the first, lives
with the code that loads it (inputs.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from services.data.sources import Source
from services.spec import Hyperparameters, JobSpec
from services.training.objectives import Objective
from services.training.runs import Runs
from services.training.state import Result


@dataclass(frozen=True)
class Split:
    """Indices of the usable images per split; `report_on`: the split the selected model is reported on."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    report_on: str  # "test" (a test split, or a separate test set) or "val"


@dataclass
class Built:
    """Every configuration of the job (one without a sweep): its spec, resolved hyperparameters and model; the
    objective they share and the cached layers any of them reads."""

    configs: list[JobSpec]
    hps: list[Hyperparameters]
    models: list[torch.nn.Module]
    objective: Objective
    layers: list[int] | None


@dataclass
class Inputs:
    train: Source
    val: Source
    description: str  # where the inputs come from, for the job's events


@dataclass
class Optimised:
    """One Result per trained configuration, or per scored L2 strength of the L-BFGS path (`points`, their figures;
    `owner[i]`: the configuration of result i); the timings; the L-BFGS probe's fit on the training split alone."""

    results: list[Result]
    timing: dict[str, Any]
    owner: list[int]
    points: list[dict[str, Any]] | None = None
    held_state: dict[str, np.ndarray] | None = None


@dataclass
class Selected:
    """The chosen result (`index`), its configuration (`config`) and model with its weights loaded; `final`: it as
    Runs; `judge`: what validation may judge (the L-BFGS fit on the training split alone, else `final`)."""

    index: int
    config: int
    spec: JobSpec
    hp: Hyperparameters
    model: torch.nn.Module
    result: Result
    final: list[Runs]
    judge: list[Runs]


@dataclass
class Report:
    """The selected model's evaluation (evaluation.report), the split it scored and how many rows, the multi-label
    decision threshold chosen on validation."""

    evaluation: dict[str, Any]
    split: str
    rows: int
    threshold: float | None
