"""The job spec: what a user submits to `POST /jobs`. Torch-free, so the API validates it without loading ML
code. Method-specific fields live in each method's config (services/methods/<name>/config.py).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.architectures import unsupported_backbone
from services.errors import SpecError  # noqa: F401 - re-exported: where job specs are, their error is
from services.methods import CONFIGS, METHOD_NAMES, MethodConfig
from services.sweeps.grid import SweepSpec, check_sweep
from services.video.spec import VideoSpec

Mode = Literal["cache", "images", "tail", "online"]


NO_NUL = r"^[^\x00-\x1f\x7f]*$"  # a file path: no NUL byte (the OS refuses it) nor other control characters
SEED_MAX = 2**32 - 1  # what every seeded generator accepts (torch.manual_seed fails from 2**64)


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None,
        min_length=1,
        pattern=NO_NUL,
        description="Dataset location on the server, inside an allowed root: an ImageFolder directory (one "
        "subfolder per class) or a CSV manifest with columns `path,label` (paths relative to the CSV), of images or "
        "of videos (.mp4, .avi, .mkv, .webm, .mov; a manifest may add `start,end` in seconds), not both. Give this "
        "or `id`, not both.",
    )
    id: str | None = Field(
        None,
        pattern=r"^ds_[0-9a-f]+$",
        description="An uploaded dataset (`POST /datasets`) of the same API key, instead of `path`; the stored "
        "spec then shows both (the API fills `path` in with the dataset's location).",
    )
    format: Literal["auto", "imagefolder", "csv"] = Field(
        "auto", description="`auto` picks `csv` for a .csv file and `imagefolder` for a directory."
    )
    val_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="Fraction of each class held out for validation (seeded, stratified), on which the epoch, the "
        "sweep configuration and the L2 strength are chosen. Every class needs at least 2 images for one to be "
        "held out; a job whose validation split would be empty is refused.",
    )
    test_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of each class held out as a test split (seeded, stratified, disjoint from "
        "validation), never seen by training or selection: the selected model is evaluated once on it "
        "(`GET /models/{id}/evaluation`). 0: no test split. `val_fraction + test_fraction` must be below 1.",
    )
    test: str | None = Field(
        None,
        min_length=1,
        pattern=NO_NUL,
        description="A separate test set on the server (an ImageFolder directory, or a CSV manifest named `*.csv`) "
        "whose labels are among the training set's classes; instead of `test_fraction`. Its images run through the "
        "backbone and the selected model once, after training.",
    )
    multi_label: bool = Field(
        False,
        description="Multi-label classification: the CSV manifest's label column holds `|`-separated tags (e.g. "
        "`cat|outdoor`), the model has one sigmoid output per tag (binary cross-entropy), validation selects on "
        "mean average precision, and predict returns the tags over a threshold chosen on validation. A row "
        "without any tag fails the job naming it, or is skipped and counted with `on_corrupt: skip`. The splits "
        "are then seeded but not stratified.",
    )
    split_seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of the validation and test splits.")
    on_corrupt: Literal["fail", "skip"] = Field(
        "fail",
        description="An image or video that cannot be decoded, or a manifest row whose file is missing, fails the job "
        "(`fail`, naming the file), or is skipped and counted (`skip`).",
    )
    duplicates: Literal["drop", "fail"] = Field(
        "drop",
        description="A file listed twice (a repeated manifest row, or a link to a file already in the dataset): left "
        "out with a warning event (`drop`) or the job is refused naming the rows (`fail`). A file listed with two "
        "labels is always refused. Either way no file is in both the training and the validation split.",
    )

    @model_validator(mode="after")
    def _path_or_id(self) -> DatasetSpec:
        # Both together only in a stored spec, where the API put the uploaded dataset's path next to its id; a
        # submission with both is refused by the API (api/routes/datasets.py: resolve_dataset).
        if self.path is None and self.id is None:
            raise ValueError("give `dataset.path` (a folder or CSV on the server) or `dataset.id` (an upload)")
        if self.val_fraction + self.test_fraction >= 1:
            total = self.val_fraction + self.test_fraction
            raise ValueError(f"dataset.val_fraction + dataset.test_fraction is {total:g}; it must be below 1 so "
                             "that images are left to train on")  # fmt: skip
        if self.test is not None and self.test_fraction > 0:
            raise ValueError("give `dataset.test` (a separate test set) or `dataset.test_fraction`, not both")
        return self


class BackboneSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9_.\-]+$", max_length=200, description="A timm ViT name, e.g. vit_base_patch16_224."
    )
    pretrained: bool = Field(True, description="Load timm's pretrained weights (a tag may follow the name: `.tag`).")

    @field_validator("name")
    @classmethod
    def _supported(cls, name: str) -> str:
        problem = unsupported_backbone(name)
        if problem:
            raise SpecError(problem)
        return name

    checkpoint: str | None = Field(
        None, pattern=NO_NUL, description="A local safetensors checkpoint inside an allowed root; overrides "
        "`pretrained`."
    )  # fmt: skip
    image_size: int | None = Field(
        None, ge=16, le=1024, description="Input size in pixels; default: the backbone's own (position embeddings "
        "are resampled)."
    )  # fmt: skip
    init_seed: int = Field(
        0, ge=0, le=SEED_MAX, description="Seed of the random initialisation when no weights are loaded."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Precision of the frozen backbone's forward where it only runs forward (extraction, `online` mode, "
        "predict): its weights cast once. `auto`: bf16 on a GPU, fp32 on a CPU. Part of the feature cache's key; "
        "bench/cache.py reports bf16's relative error against fp32. Methods trained through the backbone (apla, arc, "
        "lora, full) keep fp32 weights under bf16 autocast on a GPU.",
    )
    video: VideoSpec | None = Field(
        None,
        description="For a dataset of videos: run the ViT as an unfactorised ViViT on clips (a tubelet embedding "
        "inflated from its patch embedding, its position embeddings repeated over time). Every field is part of the "
        "feature cache's key. None: images.",
    )


class EveryKth(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every: int = Field(..., ge=1, description="Cache every k-th block, ending at the last one.")


class LastK(BaseModel):
    model_config = ConfigDict(extra="forbid")
    last: int = Field(..., ge=1, description="Cache the last k blocks.")


LayerChoice = Literal["auto", "all"] | EveryKth | LastK | list[Annotated[int, Field(ge=0)]]


def select_cached_layers(choice: LayerChoice, num_layers: int) -> list[int]:
    """The 0-based blocks a layer choice names (`auto` is resolved by the caller from the method's needs)."""
    if choice == "all":
        return list(range(num_layers))
    if isinstance(choice, EveryKth):
        return sorted(range(num_layers - 1, -1, -choice.every))
    if isinstance(choice, LastK):
        return list(range(max(0, num_layers - choice.last), num_layers))
    if isinstance(choice, list):
        bad = [i for i in choice if i >= num_layers]
        if bad:
            raise SpecError(f"extraction.layers {bad} do not exist: the backbone has {num_layers} blocks")
        return sorted(set(choice))
    raise SpecError(f"cannot select layers from {choice!r}")


class ExtractionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = Field(
        "auto",
        description="Images (or clips) per backbone forward; also the rows of one cache shard (write unit). `auto`: "
        "32 images; for clips, as many as fit a shard of about 128 MB of activations (1 to 32: a ViViT-B of 16 "
        "frames caching every layer takes 28.9 MB a clip, so 4).",
    )
    layers: LayerChoice = Field(
        "auto",
        description="Which blocks' outputs are cached: `auto` (what the method needs: the last block for linear, "
        'the side layers for losa, the input of the adapted blocks in tail mode), `all`, `{"every": k}`, '
        '`{"last": k}`, or a list of 0-based block indices. Fewer layers: a smaller cache, fewer later jobs '
        "that can reuse it.",
    )
    tokens: Literal["auto", "all", "cls", "mean"] = Field(
        "auto",
        description="Which tokens are cached per layer: `all` (needed by losa and tail mode; T x D per layer), "
        "`cls` (the class token only, 1 x D: exact for a linear probe on a class-token backbone) or `mean` (the "
        "mean of the patch tokens, 1 x D; a linear probe then normalises the mean rather than averaging normalised "
        "tokens). `auto`: `all` when the method needs it, else the pooled token the linear probe reads.",
    )
    codec: Literal["none", "zstd", "blosc"] = Field(
        "none", description="Lossless compression of the cached activations (blosc: zstd with bit shuffling)."
    )
    shards: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        "auto",
        description="Split the extraction into this many shard tasks, which extract workers on any machine run in "
        "parallel, each writing its own cache shards. `auto`: one per live extract worker.",
    )
    decode: Literal["cpu", "device"] = Field(
        "cpu",
        description="Where images are decoded and resized. `cpu`: Pillow in the loader processes (the backbone's "
        "own eval transform, exactly). `device`: JPEG files decoded on the GPU (nvJPEG, batched) and every image "
        "resized there by torchvision (other formats decoded by Pillow first); for loaders that cannot keep up "
        "with the GPU. A different preprocessing (pixels differ slightly), so a cache entry of its own.",
    )
    keepbits: int | None = Field(
        None,
        ge=1,
        le=10,
        description="Lossy: round float16 mantissas to this many bits (numcodecs BitRound, of 10) before the codec; "
        "fewer bits compress better at some cost in accuracy (see bench/cache.py). None: exact.",
    )


SHARD_BYTES = 128 * 10**6  # what `auto` sizes a batch of clips by


def extraction_rows(batch_size: int | str, bytes_per_item: int, video: bool) -> int:
    """`extraction.batch_size` resolved: as given, else 32 images, or the clips whose activations fill a shard."""
    if batch_size != "auto":
        return int(batch_size)
    return 32 if not video else max(1, min(32, SHARD_BYTES // max(1, bytes_per_item)))


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

    epochs: int = Field(10, ge=1, le=10_000, description="Passes over the training split.")
    batch_size: int = Field(64, ge=1, le=65_536, description="Mini-batch size.")
    optimizer: Literal["auto", "sgd", "adamw"] = Field(
        "auto",
        description="`sgd` (momentum 0.9) or `adamw`; `auto`: the method's default from its paper and official code "
        f"({_defaults('optimizer')}).",
    )
    lr: Annotated[float, Field(gt=0, le=10)] | Literal["auto"] = Field(
        "auto",
        description=f"Peak learning rate; `auto`: the method's default ({_defaults('lr')}). LoSA's 0.05 is the "
        "paper's value at batch size 512, scaled linearly to the job's batch (0.05 x batch_size / 512); APLA's "
        "follows its rank as the official configs do (3e-5 at r=8 up to 1e-4 at r=128).",
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
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of initialisation and batch order.")
    compile: bool = Field(
        False,
        description="Run the trained module through `torch.compile` (side networks gain most: many small ops). The "
        "first step then includes the compilation; the job's metrics report it as `first_step_seconds`.",
    )

    def resolved(self, defaults: dict) -> dict:
        """Fill `auto` fields from the method's defaults. A default learning rate given for a reference batch
        size (`lr_reference_batch`, e.g. LoSA's 0.05 at 512) is scaled linearly to this job's batch size (Goyal et
        al. 2017); an explicit `lr` is used as given."""
        out = self.model_dump()
        for key, value in defaults.items():
            if out.get(key) == "auto":
                out[key] = value
                if key == "lr" and defaults.get("lr_reference_batch"):
                    out[key] = value * self.batch_size / defaults["lr_reference_batch"]
        for key in ("lr", "weight_decay", "warmup_epochs"):
            if isinstance(out[key], float | int) and out[key] < 0:
                raise SpecError(f"training.{key} must be >= 0")
        return out


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

    def configurations(self) -> list[JobSpec]:
        """The job itself, or one spec per configuration of its sweep (each validated, so a bad value is named)."""
        if self.sweep is None:
            return [self]
        base = self.model_dump(exclude={"sweep"})
        specs = []
        for overrides in self.sweep.configurations():
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
        needs = [c.method.needs(num_layers, global_pool) for c in self.configurations()]
        layers = sorted({layer for needed, _ in needs for layer in needed})
        return layers, tuple(t for t in needs[0][1] if all(t in accepted for _, accepted in needs))

    def cached_layers_and_tokens(self, num_layers: int, global_pool: str) -> tuple[list[int], str]:
        """What the extraction step caches for this job: `extraction.layers/tokens`, `auto` resolved to what the
        method needs; an explicit choice must include it."""
        needed, accepted = self.method_needs(num_layers, global_pool)
        choice = self.extraction.layers
        layers = needed if choice == "auto" else select_cached_layers(choice, num_layers)
        missing = sorted(set(needed) - set(layers))
        if missing:
            raise SpecError(f"extraction.layers caches {layers} but {self.method.name} in mode {self.mode} also reads "
                             f"blocks {missing}; add them or use `auto`")  # fmt: skip
        tokens = accepted[0] if self.extraction.tokens == "auto" else self.extraction.tokens
        if tokens not in accepted:
            raise SpecError(f"extraction.tokens {tokens!r} does not suit {self.method.name} in mode {self.mode} "
                             f"(choose {' or '.join(accepted)})")  # fmt: skip
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
