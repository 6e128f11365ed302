"""APLA: Attention Projection Layer Adaptation (Sorkhei, Konuk, Smith, Matsoukas, "APLA: A Simple Adaptation
Method for Vision Transformers", arXiv:2503.11335, 2025; official code github.com/MoeinSorkhei/APLA).

In every adapted block, r randomly chosen output rows of the attention output projection `attn.proj`
(rows of its [D_out, D_in] weight, with their biases) are trained and the rest of the backbone stays frozen.
Nothing is added to the architecture: after training the rows merge back into an ordinary Linear.
Trainable parameters (classifier excluded): r x (D_in + 1) per adapted block, i.e. r x 769 x 12 for ViT-B/16
(r=8 -> 73,824; r=32 -> 295,296; r=128 -> 1,181,184).
"""

import math
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.methods.defaults import TrainingDefaults


class AplaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str] = "adapted"  # trained through the backbone; build(config, vit, num_classes, tail_blocks)
    modes: ClassVar[tuple[str, ...]] = ("images", "tail")  # the first is the default

    name: Literal["apla"] = Field("apla", description="Method name: APLA, random rows of attn.proj trained.")
    rank: int = Field(
        8,
        ge=1,
        le=65_536,
        description="Number r of trainable output rows of `attn.proj` per block (the official code's "
        "`partial_size`: 8 in its NABirds config, 128 in its ImageNet one). At most the embedding dimension.",
    )
    subset_seed: int = Field(
        0,
        ge=0,
        description="Seed of the random choice of rows; block i draws its rows from (subset_seed, i), so a "
        "block gets the same rows in `images` and `tail` mode. The chosen rows are saved with the model.",
    )

    def training_defaults(self) -> TrainingDefaults:
        # The official configs (params/finetune/dinov2/*/vit_b): AdamW, weight decay 1e-5 (none on biases and 1-D
        # parameters: DefaultWrapper.get_params_groups), gradient norm clipped at 1.0 (`grad_clipping`), a linear
        # warmup of 500 iterations then cosine decay over 100 epochs at batch size 64. The lr goes with the rank:
        # 3e-5 at r=8 (NABirds) and 1e-4 at r=128 (ImageNet); see `default_lr`. Our trainer counts warmup in
        # epochs: 500 iterations at batch 64 are 32k images, about one epoch of a mid-sized dataset.
        return {
            "optimizer": "adamw",
            "lr": default_lr(self.rank),
            "weight_decay": 1e-5,
            "warmup_epochs": 1.0,
            "clip_grad_norm": 1.0,
        }


def default_lr(rank: int) -> float:
    """The official configs' lr for a rank: 3e-5 at r=8 and 1e-4 at r=128, log-linear in the rank between them
    (our interpolation; the code has no rule) and held at those values outside: r=16 -> 4.1e-5, r=32 -> 5.5e-5."""
    r = min(max(rank, 8), 128)
    return float(f"{3e-5 * (r / 8) ** (math.log(1e-4 / 3e-5) / math.log(128 / 8)):.3g}")
