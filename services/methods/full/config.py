"""Full fine-tuning: every backbone weight and the new classifier are trained (the baseline of every adaptation
paper: LoSA, APLA and ARC all compare against it; reported VTAB-1k mean with ViT-B/16 IN-21k: 68.9).

Trained on images only: the whole backbone changes, so no cached activation stays valid.
"""

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.methods.defaults import TrainingDefaults


class FullConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str] = "adapted"  # trained through the backbone; build(config, vit, num_classes, tail_blocks)
    modes: ClassVar[tuple[str, ...]] = ("images",)

    name: Literal["full"] = Field("full", description="Method name: full fine-tuning of the backbone.")

    def training_defaults(self) -> TrainingDefaults:
        # DeiT/MAE-style ViT fine-tuning: AdamW, weight decay 0.05, peak lr 5e-4 x batch / 512, which is 6.25e-5 at
        # the default batch of 64; rounded down to 5e-5, since small transfer sets drift from the pretrained
        # features at higher rates. Warmup keeps the first steps of the random classifier from wrecking them. No
        # weight decay on pos_embed, cls_token, norms and biases (timm's no_weight_decay(), as DeiT and MAE train);
        # DeiT's and MAE's fine-tuning scripts clip no gradients by default.
        return {"optimizer": "adamw", "lr": 5e-5, "weight_decay": 0.05, "warmup_epochs": 1.0, "clip_grad_norm": None}
