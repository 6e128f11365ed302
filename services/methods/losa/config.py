"""LoSA: Low-rank Side Adaptation (Mercea et al., "Time-, Memory- and Parameter-Efficient Visual Adaptation",
CVPR 2024).

A side network refines the frozen backbone's output from its intermediate activations, never
backpropagating through the backbone: a_0 = z_L; a_l = a_{l-1} + g_l(z_l + a_{l-1}) with
g(x) = s * W_up GeLU(W_down x + b_down) + b_up, applied along channels on odd l and along tokens on even l
(MLP-Mixer style). W_up starts at zero, so step 0 equals a linear probe on the backbone output.
Trainable parameters (classifier excluded) for ViT-B/16: r=16 -> 191,262 (+1 scale per layer).
"""

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.methods.defaults import TrainingDefaults
from services.methods.linear.config import Pool


class LosaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str] = "side"  # trained on backbone activations; build(config, info: FeatureInfo)
    modes: ClassVar[tuple[str, ...]] = ("cache", "online")  # the first is the default

    name: Literal["losa"] = Field("losa", description="Method name: a LoSA side network.")
    rank: int = Field(16, ge=1, le=4096, description="Bottleneck rank r of every side layer (paper: 4, 8, 16, 64).")
    layers: Literal["all"] | int | list[int] = Field(
        "all",
        description="Backbone layers the side network reads: `all`, a count n (n evenly spaced layers ending at "
        "the last, as in the paper's Table 5; a count above the backbone's blocks reads them all), or explicit "
        "0-based block indices.",
    )
    pool: Pool = Field("auto", description="Token pooling before the classifier (`cls`, `mean` or `auto`).")

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: object) -> object:
        if isinstance(value, int) and value < 1:
            raise ValueError("a layer count must be at least 1")
        if isinstance(value, list):
            if not value:
                raise ValueError("the layer list is empty")
            if any(i < 0 for i in value) or len(set(value)) != len(value):
                raise ValueError("layer indices must be distinct and >= 0")
        return value

    def select_layers(self, num_layers: int) -> list[int]:
        """The backbone blocks (0-based, ascending) whose outputs feed the side layers."""
        if self.layers == "all":
            return list(range(num_layers))
        if isinstance(self.layers, int):
            n = min(self.layers, num_layers)
            return [round(num_layers * (i + 1) / n) - 1 for i in range(n)]
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise ValueError(f"layers {bad} do not exist: the backbone has {num_layers} blocks (0..{num_layers - 1})")
        return sorted(self.layers)

    def needs(self, num_layers: int, global_pool: str) -> tuple[list[int], tuple[str, ...]]:
        """The cached layers it reads (its side layers and the last block, a_0 = z_L), every token (it mixes them)."""
        return sorted(set(self.select_layers(num_layers)) | {num_layers - 1}), ("all",)

    def training_defaults(self) -> TrainingDefaults:
        # SGD with momentum 0.9 and a cosine schedule with linear warmup, as the paper trains (Appendix D, Tables 12,
        # 13); no gradient clipping (the paper names none, and there is no official code). The paper's learning rate
        # barely follows its batch (0.05 at 512 on images, 0.04 at 64 on Kinetics), and on held-out digits the best
        # rate grew about as the square root of the batch (bench/lr_rule.py): `lr: auto` is a grid of 4 rates around
        # 0.1 x sqrt(batch / 64), trained together from each pass over the cache, the lower half stopped at a quarter
        # and at half of the epochs (services/training/halving.py). `epochs: auto`: enough for 30,000 training
        # samples, between 10 and 100 (on 900 digits 30 epochs gained 1.5 to 3.4 test points over 10).
        return {
            "optimizer": "sgd",
            "lr": 0.1,
            "lr_reference_batch": 64,
            "lr_scaling": "sqrt",
            "lr_grid": (0.25, 0.5, 1.0, 2.0),
            "epochs": 10,
            "epoch_samples": 30_000,
            "max_epochs": 100,
            "weight_decay": 0.0,
            "warmup_epochs": 1.0,
            "clip_grad_norm": None,
        }
