"""LoRA: Low-Rank Adaptation (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022).

A baseline: every targeted frozen Linear W of the adapted blocks becomes W x + (alpha / r) B A x, with A (r x in)
and B (out x r) trainable and B zero-initialised, so step 0 equals the pretrained model. After training B A
merges into W, so inference costs exactly the backbone. The `peft` library does the work (model.py).
Targets, as the LoSA paper's LoRA baseline found best (Mercea et al., CVPR 2024, App. B, Tab. 8): every linear
projection of the block, i.e. `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`.
Trainable parameters (classifier excluded) are r x (in + out) per target and block; ViT-B/16, r=8, all four
targets: 12 x 8 x ((768+2304) + (768+768) + (768+3072) + (3072+768)) = 1,179,648.
"""

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.methods.defaults import TrainingDefaults

Target = Literal["qkv", "proj", "fc1", "fc2"]


class LoraMethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str] = "adapted"  # trained through the backbone; build(config, vit, num_classes, tail_blocks)
    modes: ClassVar[tuple[str, ...]] = ("images", "tail")  # the first is the default

    name: Literal["lora"] = Field("lora", description="Method name: LoRA low-rank updates of the block's Linears.")
    rank: int = Field(8, ge=1, le=4096, description="Rank r of every low-rank update B A.")
    # Hu et al. (Sec. 4.1) set alpha to the first r they try and keep it fixed, so that with Adam changing r needs
    # no new learning rate; alpha = 8 = the default rank gives the update scale alpha / r = 1.
    alpha: float = Field(
        8.0,
        gt=0,
        description="LoRA alpha: the update is scaled by alpha / rank. Kept fixed when the rank changes (Hu et al.), "
        "so the default scale is 1 at rank 8 and 0.5 at rank 16.",
    )
    # VTAB-1k-sized training sets (800-1000 images) overfit easily; 0.1 is the LoRA dropout of the VTAB-1k LoRA
    # baseline in NOAH (Zhang et al. 2022, `--drop_rate_LoRA 0.1`) and ARC's adapter dropout.
    dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="Dropout on the input of every LoRA branch (A), during training only."
    )
    targets: list[Target] = Field(
        default_factory=lambda: ["qkv", "proj", "fc1", "fc2"],
        min_length=1,
        description="Linear layers of each adapted block that get a LoRA update: `qkv` (attention input "
        "projection), `proj` (attention output projection), `fc1`, `fc2` (the MLP).",
    )

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("targets must be distinct")
        return value

    def training_defaults(self) -> TrainingDefaults:
        # NOAH's VTAB-1k LoRA baseline on ViT-B/16 (Zhang et al. 2022, configs/LoRA/VTAB in its repository):
        # AdamW, weight decay 1e-4, batch 64, cosine with warmup over the first 10% of training (10 of 100 epochs;
        # 1 of our default 10). Its lr sweep is {5e-3, 1e-3}; we take the lower, 1e-3, since we adapt all four
        # Linears of each block and train 10x shorter by default. Its script passes no --clip-grad (default None).
        return {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 1.0, "clip_grad_norm": None}
