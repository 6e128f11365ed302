"""The job spec as a whole (`JobSpec`): its parts, the sweep, and the checks that span parts (modes, finite numbers,
what the cache must hold for the method)."""

from __future__ import annotations

import json
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.errors import SpecError
from services.methods import MethodConfig
from services.spec.backbone import BackboneSpec
from services.spec.dataset import DatasetSpec
from services.spec.extraction import ExtractionSpec, select_cached_layers
from services.spec.fields import SEED_MAX
from services.spec.sweep import SweepSpec, check_sweep
from services.spec.training import ExecutionSpec, TrainingSpec

Mode = Literal["cache", "images", "tail", "online"]


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200, description="A label for the job and its model.")
    dataset: DatasetSpec = Field(..., description="Where the images are and how to split them.")
    backbone: BackboneSpec = Field(..., description="The frozen ViT to adapt.")
    method: MethodConfig = Field(..., description="The adaptation method; `name` selects it.")
    extraction: ExtractionSpec = Field(default_factory=ExtractionSpec, description="How features are cached.")
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec, description="Where the method's inputs come from.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation settings.")
    sweep: SweepSpec | None = Field(
        None,
        description='Train a grid of configurations in this one job, e.g. `{"lr": [0.01, 0.05], "rank": [4, '
        "16]}` (4 configurations): every configuration sees each mini-batch as it is read (one pass over the cache "
        "per epoch for the whole grid), the best on validation becomes the job's model, and every configuration's "
        "curve and score is in the job's metrics (`sweep`). At most SIDETUNE_MAX_SWEEP_CONFIGS configurations.",
    )

    def server_paths(self) -> list[tuple[str, str, str | None]]:
        """Every path on the server the spec names, as (field, path, the upload id it was resolved from): what the API
        checks at submission (services/paths.py). A new path field goes here, and is checked where it is read too."""
        ds, backbone = self.dataset, self.backbone
        fields = [
            *(("dataset.path", path, ds.id) for path in ds.locations()),  # a pattern of shards: each of them
            *(("dataset.test", path, ds.test_id) for path in ds.locations(test=True)),
            ("backbone.checkpoint", backbone.checkpoint, None),
        ]
        return [(field, path, upload) for field, path, upload in fields if path is not None]

    @model_validator(mode="after")
    def _finite(self) -> JobSpec:
        """Every number finite and every seed in range, in every part of the spec (the methods' configs included):
        `"inf"` and `"nan"` parse as floats, and a NaN learning rate would "succeed" with a NaN model."""
        problem = _bad_number(self, "")
        if problem:
            raise SpecError(problem)
        return self

    @model_validator(mode="after")
    def _check_mode(self) -> JobSpec:
        modes = type(self.method).modes
        mode = self.execution.mode
        if mode != "auto" and mode not in modes:
            name, choices = self.method.name, " or ".join(modes)
            raise ValueError(f"execution.mode {mode!r} is not available for method {name!r} (choose {choices})")
        if self.execution.augment and self.mode not in ("images", "online"):
            raise ValueError(
                f"execution.augment needs mode images or online; mode {self.mode!r} trains on fixed cached features"
            )
        if self.sweep is not None:
            check_sweep(self.sweep, self.method, self.linear_solver)
        return self

    @property
    def linear_solver(self) -> str | None:
        """The linear probe's solver, `auto` resolved (L-BFGS on cached features, SGD online); None for others."""
        return self.method.resolved_solver(self.mode) if self.method.name == "linear" else None

    def automatic_lrs(self) -> list[float] | None:
        """The learning rates an automatic grid trains (a method whose defaults give `lr_grid`, e.g. LoSA, with
        `training.lr: auto` and no `sweep.lr`): the default rate at the job's batch size times each factor."""
        defaults = self.method.training_defaults()
        if self.training.lr != "auto" or "lr_grid" not in defaults or (self.sweep is not None and self.sweep.lr):
            return None
        center = self.training.auto_lr(defaults)
        return [float(f"{center * factor:.4g}") for factor in defaults["lr_grid"]]

    def grid(self) -> SweepSpec | None:
        """What the job trains: its sweep, with an automatic grid's learning rates as its `lr` axis; None for one
        configuration."""
        lrs = self.automatic_lrs()
        if lrs is None:
            return self.sweep
        given = self.sweep.model_dump(exclude_none=True) if self.sweep is not None else {}
        return SweepSpec.model_validate({**given, "lr": lrs})

    def configurations(self) -> list[JobSpec]:
        """The job itself, or one spec per configuration of its grid (each validated, so a bad value is named)."""
        grid = self.grid()
        if grid is None:
            return [self]
        base = self.model_dump(exclude={"sweep"})
        if base["training"]["early_termination"] == "auto":
            base["training"]["early_termination"] = self.automatic_lrs() is not None
        specs = []
        for overrides in grid.configurations():
            data = {**base, "method": dict(base["method"]), "training": dict(base["training"])}
            for key, value in overrides.items():
                data["training" if key in ("lr", "weight_decay") else "method"][key] = value
            try:
                specs.append(JobSpec.model_validate(data))
            except ValueError as e:
                raise ValueError(f"sweep configuration {overrides}: {e}") from None
        return specs

    @property
    def mode(self) -> Mode:
        """The execution mode, `auto` resolved to the method's default."""
        return type(self.method).modes[0] if self.execution.mode == "auto" else self.execution.mode

    @property
    def needs_cache(self) -> bool:
        return self.mode in ("cache", "tail")

    def method_needs(self, num_layers: int, global_pool: str) -> tuple[list[int], tuple[str, ...]]:
        """The cached layers the method reads and the token modes it accepts (smallest first)."""
        if self.mode == "tail":
            if not 1 <= self.execution.tail_blocks < num_layers:
                raise SpecError(f"execution.tail_blocks must be between 1 and {num_layers - 1} for this backbone")
            return [num_layers - self.execution.tail_blocks - 1], ("all",)
        # a sweep reads what any of its configurations reads, in a token mode all of them accept
        configs = self.configurations()
        self._check_layer_choices(configs, num_layers)
        needs = [c.method.needs(num_layers, global_pool) for c in configs]
        layers = sorted({layer for needed, _ in needs for layer in needed})
        return layers, tuple(t for t in needs[0][1] if all(t in accepted for _, accepted in needs))

    def _check_layer_choices(self, configs: list[JobSpec], num_layers: int) -> None:
        """Refuse `sweep.layers` choices that select the same blocks of this backbone (`all` and its block count, a
        list in two orders): they would train the same configuration twice."""
        grid = self.grid()
        if grid is None or grid.layers is None:
            return
        seen: dict[str, dict] = {}
        for overrides, config in zip(grid.configurations(), configs, strict=True):
            blocks = config.method.select_layers(num_layers)
            key = json.dumps({**overrides, "layers": blocks}, sort_keys=True)
            if key in seen:
                raise SpecError(
                    f"sweep.layers: {seen[key]['layers']!r} and {overrides['layers']!r} select the same "
                    f"blocks {blocks} of this backbone; keep one"
                )
            seen[key] = overrides

    def cached_layers_and_tokens(self, num_layers: int, global_pool: str) -> tuple[list[int], str]:
        """What the extraction step caches for this job: `extraction.layers/tokens`, `auto` resolved to what the
        method needs; an explicit choice must include it."""
        needed, accepted = self.method_needs(num_layers, global_pool)
        choice = self.extraction.layers
        layers = needed if choice == "auto" else select_cached_layers(choice, num_layers)
        missing = sorted(set(needed) - set(layers))
        if missing:
            raise SpecError(
                f"extraction.layers caches {layers} but {self.method.name} in mode {self.mode} also reads "
                f"blocks {missing}; add them or use `auto`"
            )
        tokens = accepted[0] if self.extraction.tokens == "auto" else self.extraction.tokens
        if tokens not in accepted:
            raise SpecError(
                f"extraction.tokens {tokens!r} does not suit {self.method.name} in mode {self.mode} "
                f"(choose {' or '.join(accepted)})"
            )
        return layers, tokens


def _bad_number(value: object, path: str) -> str | None:
    """The first non-finite float or out-of-range seed in a validated spec, as `field: problem`."""
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            problem = _bad_number(getattr(value, name), f"{path}.{name}" if path else name)
            if problem:
                return problem
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            problem = _bad_number(item, f"{path}.{i}")
            if problem:
                return problem
    elif isinstance(value, dict):
        for key, item in value.items():
            problem = _bad_number(item, f"{path}.{key}")
            if problem:
                return problem
    elif isinstance(value, float) and not math.isfinite(value):
        return f"{path}: must be a finite number, not {value}"
    elif isinstance(value, int) and not isinstance(value, bool) and path.endswith("seed"):
        return None if 0 <= value <= SEED_MAX else f"{path}: a seed must be between 0 and {SEED_MAX}"
    return None
