"""The `sweep` of a job spec: a grid over some of its settings, every combination trained by the one job.

Torch-free, so the API validates sweeps at submission. Keys: `lr` and `weight_decay` (training settings, every
method) and `rank`, `layers`, `pool` (method settings, for the side methods that have them: linear, losa).
Methods that train through the backbone (apla, arc, lora, full) sweep `lr` and `weight_decay` only: each of their
configurations is a whole adapted backbone, so only the optimisation settings are offered.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Annotated, Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.errors import SpecError

TRAINING_KEYS = ("lr", "weight_decay")
METHOD_KEYS = ("rank", "layers", "pool")


class Overrides(TypedDict, total=False):
    """One configuration of a grid: the swept keys with its values (a job's metrics name each configuration so)."""

    lr: float
    weight_decay: float
    rank: int
    layers: Literal["all"] | int | list[int]
    pool: Literal["auto", "cls", "mean"]


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # the bounds of training.lr and training.weight_decay (services/spec/training.py): refused at submission
    lr: list[Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]] | None = Field(
        None, min_length=1, description="Peak learning rates (replace `training.lr`)."
    )
    weight_decay: list[Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)]] | None = Field(
        None,
        min_length=1,
        description="Weight decays (replace `training.weight_decay`); for the L-BFGS linear probe, the L2 "
        "strengths to choose from on validation.",
    )
    rank: list[Annotated[int, Field(ge=1, le=4096, strict=True)]] | None = Field(
        None, min_length=1, description="Ranks (`method.rank`; losa)."
    )
    layers: list[Literal["all"] | Annotated[int, Field(ge=1)] | list[Annotated[int, Field(ge=0)]]] | None = Field(
        None, min_length=1, description="Side layer choices (`method.layers`; losa): `all`, a count, or indices."
    )
    pool: list[Literal["auto", "cls", "mean"]] | None = Field(
        None, min_length=1, description="Token poolings (`method.pool`; linear, losa)."
    )

    @model_validator(mode="after")
    def _not_empty(self) -> SweepSpec:
        grid = self.grid()
        if not grid:
            raise ValueError(f"the sweep is empty: give a list of values for one of {', '.join(self.keys())}")
        for key, values in grid.items():
            twice = sorted(v for v, n in Counter(map(repr, values)).items() if n > 1)
            if twice:
                raise ValueError(f"sweep.{key} lists {', '.join(twice)} more than once")
        return self

    @staticmethod
    def keys() -> tuple[str, ...]:
        return TRAINING_KEYS + METHOD_KEYS

    def grid(self) -> dict[str, list[Any]]:
        """The swept keys and their values, in the order of `keys()`."""
        return {k: getattr(self, k) for k in self.keys() if getattr(self, k) is not None}

    def size(self) -> int:
        n = 1
        for values in self.grid().values():
            n *= len(values)
        return n

    def describe(self) -> str:
        """e.g. `4 lr x 8 weight_decay = 32 configurations`."""
        parts = " x ".join(f"{len(v)} {k}" for k, v in self.grid().items())
        return f"{parts} = {self.size()} configurations"

    def configurations(self) -> list[Overrides]:
        """Every combination, as {key: value} overrides, the last key varying fastest."""
        grid = self.grid()
        return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def check_sweep(sweep: SweepSpec, method: BaseModel, solver: str | None) -> None:
    """Refuse keys the method does not have (ValueError naming the key). `solver`: the linear probe's resolved
    solver, else None."""
    name, kind = method.name, type(method).kind
    if name == "auto":
        raise ValueError(
            "sweep: method 'auto' chooses by itself (the linear probe's L2 grid, LoSA's learning-rate "
            "grid); to sweep settings of your own, name the method"
        )
    for key in sweep.grid():
        if key in METHOD_KEYS and kind != "side":
            raise ValueError(
                f"sweep.{key}: method {name!r} trains through the backbone, so its sweeps take "
                f"{' and '.join(TRAINING_KEYS)} only"
            )
        if key in METHOD_KEYS and key not in type(method).model_fields:
            raise ValueError(f"sweep.{key}: method {name!r} has no field {key!r}")
        if key == "lr" and solver == "lbfgs":
            raise ValueError(
                "sweep.lr: the linear probe's L-BFGS solver has no learning rate (sweep "
                "`weight_decay`, its L2 strength, or set method.solver to 'sgd')"
            )


def check_size(sweep: SweepSpec | None, cap: int) -> None:
    if sweep is not None and sweep.size() > cap:
        raise SpecError(f"sweep: {sweep.describe()}; at most {cap} are allowed (SIDETUNE_MAX_SWEEP_CONFIGS)")
