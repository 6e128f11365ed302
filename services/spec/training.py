"""`execution` and `training` of a job spec: where a method's inputs come from, and the optimisation settings
(each `auto` resolved from the method's own defaults)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.errors import SpecError
from services.methods import CONFIGS, METHOD_NAMES
from services.methods.defaults import TrainingDefaults
from services.spec.fields import SEED_MAX


class ExecutionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "cache", "images", "tail", "online"] = Field(
        "auto",
        description="How the method sees the data. `cache`: from the feature cache, no backbone forward while "
        "training (linear, losa). `images`: forward and backward through the backbone on images, augmentation "
        "possible (apla, arc, lora, full). `tail`: only the last `tail_blocks` blocks are adapted, trained from the "
        "cached input of the first of them, so the frozen prefix never runs (apla, arc, lora). `online`: the "
        "backbone runs under no_grad on every step, as the LoSA paper trains, which allows augmentation "
        "(linear, losa). `auto`: the method's first mode (`cache` for linear and losa, `images` for the others).",
    )
    tail_blocks: int = Field(2, ge=1, le=1000, description="In `tail` mode, how many final blocks are adapted.")
    augment: bool = Field(
        False,
        description="Random resized crops, flips and colour jitter on training images (`images` and `online` "
        "modes only: a cache holds fixed features).",
    )


def _defaults(key: str) -> str:
    """Every method's default for a training field, for the API docs (from the methods' own configs)."""
    return ", ".join(f"{name} {CONFIGS[name]().training_defaults()[key]}" for name in METHOD_NAMES)


class TrainingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: Annotated[int, Field(ge=1, le=10_000)] | Literal["auto"] = Field(
        "auto",
        description="Passes over the training split; `auto`: 10, and for LoSA enough for 30,000 training samples "
        "(ceil(30,000 / training images)), between 10 and 100.",
    )
    batch_size: int = Field(64, ge=1, le=65_536, description="Mini-batch size.")
    optimizer: Literal["auto", "sgd", "adamw"] = Field(
        "auto",
        description="`sgd` (momentum 0.9) or `adamw`; `auto`: the method's default from its paper and official code "
        f"({_defaults('optimizer')}).",
    )
    lr: Annotated[float, Field(gt=0, le=10)] | Literal["auto"] = Field(
        "auto",
        description=f"Peak learning rate; `auto`: the method's default ({_defaults('lr')}). LoSA's is a grid: 0.1 x "
        "sqrt(batch_size / 64) times 0.25, 0.5, 1 and 2, trained together from each pass over the cache, the best "
        "on validation kept (with `early_termination`); APLA's follows its rank as the official configs do (3e-5 at "
        "r=8 up to 1e-4 at r=128).",
    )
    weight_decay: Annotated[float, Field(ge=0, le=10)] | Literal["auto"] = Field(
        "auto", description=f"Weight decay; `auto`: the method's default ({_defaults('weight_decay')})."
    )
    warmup_epochs: Annotated[float, Field(ge=0, le=10_000)] | Literal["auto"] = Field(
        "auto",
        description="Linear warmup length in epochs before the cosine decay (at most half the run); `auto`: the "
        "method's default "
        f"({_defaults('warmup_epochs')}).",
    )
    clip_grad_norm: Annotated[float, Field(gt=0)] | None | Literal["auto"] = Field(
        "auto",
        description="Clip the gradient's global L2 norm to this value before every step (per configuration in a "
        "sweep); null: no clipping; `auto`: the method's official code "
        f"({_defaults('clip_grad_norm')}).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Label smoothing of the training loss (Szegedy et al., CVPR 2016): the target puts this much "
        "probability mass uniformly over the classes (multi-label: targets become y (1 - e) + e / 2). 0.1 is the "
        "usual value (e.g. APLA's ImageNet config, DeiT). Validation and test figures use the plain loss.",
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none",
        description="`balanced`, for unbalanced datasets: each class's loss is weighted by n / (classes x n_c) "
        "over the training split (scikit-learn's class_weight='balanced'); multi-label: each tag's positives by "
        "its negatives / positives (BCE pos_weight).",
    )
    early_termination: bool | Literal["auto"] = Field(
        "auto",
        description="Successive halving over a sweep's configurations (Jamieson & Talwalkar 2016): after a quarter "
        "and after half of the epochs, the half with the lower best validation figure so far stops, and is never "
        "the job's model; the metrics report the configuration-epochs saved. `auto`: on for an automatic grid (LoSA's "
        "`lr: auto`), off for a sweep you list.",
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of initialisation and batch order.")
    compile: bool = Field(
        False,
        description="Run the trained module through `torch.compile` (side networks gain most: many small ops). The "
        "first step then includes the compilation; the job's metrics report it as `first_step_seconds`.",
    )

    def auto_lr(self, defaults: TrainingDefaults) -> float:
        """The method's default learning rate at this job's batch size: given for a reference batch
        (`lr_reference_batch`), it is scaled linearly (Goyal et al. 2017) or, with `lr_scaling: sqrt`, as the square
        root of the batch ratio (Krizhevsky 2014; Hoffer et al. 2017)."""
        lr, ref = defaults["lr"], defaults.get("lr_reference_batch")
        if not ref:
            return lr
        ratio = self.batch_size / ref
        return lr * (ratio**0.5 if defaults.get("lr_scaling") == "sqrt" else ratio)

    def auto_epochs(self, defaults: TrainingDefaults, train_images: int | None) -> int:
        """`epochs: auto`: the method's default, or for a method that gives `epoch_samples`, enough epochs for that
        many training samples, between its default and `max_epochs`."""
        epochs = defaults.get("epochs", 10)
        if defaults.get("epoch_samples") and train_images:
            wanted = -(-defaults["epoch_samples"] // train_images)
            epochs = min(max(epochs, wanted), defaults.get("max_epochs", wanted))
        return epochs

    def resolved(self, defaults: TrainingDefaults, train_images: int | None = None) -> Hyperparameters:
        """Fill `auto` fields from the method's defaults (the learning rate at this batch size, `auto_lr`; the epochs
        for `train_images`, `auto_epochs`); an explicit value is used as given. `early_termination: auto` is off
        here: JobSpec.configurations() turns it on for an automatic grid."""
        out = self.model_dump()
        if out["epochs"] == "auto":
            out["epochs"] = self.auto_epochs(defaults, train_images)
        if out["early_termination"] == "auto":
            out["early_termination"] = False
        for key, value in defaults.items():
            if out.get(key) == "auto":
                out[key] = self.auto_lr(defaults) if key == "lr" else value
        for key in ("lr", "weight_decay", "warmup_epochs"):
            if isinstance(out[key], float | int) and out[key] < 0:
                raise SpecError(f"training.{key} must be >= 0")
        return Hyperparameters.model_validate(out)


class Hyperparameters(BaseModel):
    """One configuration's training settings with every `auto` resolved (`TrainingSpec.resolved`): what the loop,
    the optimizers and the objective read. Its fields are TrainingSpec's, in the same order, so that `model_dump()`
    (the job's "hyperparameters" event and the model's config) keeps the keys the API has always shown. The fields
    that have no method default are TrainingSpec's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int
    batch_size: int = 64
    optimizer: Literal["sgd", "adamw"]
    lr: float
    weight_decay: float
    warmup_epochs: float
    clip_grad_norm: float | None
    label_smoothing: float = 0.0
    class_weights: Literal["none", "balanced"] = "none"
    early_termination: bool = False
    seed: int = 0
    compile: bool = False
