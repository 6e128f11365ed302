"""A method's own defaults for the `auto` fields of a job's `training` (`training_defaults()` of each method's config;
services/spec/training.py: `TrainingSpec.resolved` fills them in), from its paper and official code. Torch-free."""

from typing import Literal, TypedDict


class TrainingDefaults(TypedDict, total=False):
    optimizer: Literal["sgd", "adamw"]
    lr: float
    weight_decay: float
    warmup_epochs: float
    clip_grad_norm: float | None
    epochs: int  # `epochs: auto` (else 10)
    # `lr` is given for this batch size and scaled to the job's: linearly, or as the square root of the ratio
    lr_reference_batch: int
    lr_scaling: Literal["linear", "sqrt"]
    lr_grid: tuple[float, ...]  # `lr: auto` trains these factors of the rate together, the best kept
    epoch_samples: int  # `epochs: auto`: enough epochs for this many training samples, up to `max_epochs`
    max_epochs: int
