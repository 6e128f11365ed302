"""ARC: Adapter Re-Composing (Dong et al., "Efficient Adaptation of Large Vision Transformer via Adapter
Re-Composing", NeurIPS 2023; official code: github DavidYanAnDe/ARC).

Before the attention and before the MLP of every adapted block, the normalised tokens pass a linear adapter
h' = h + Dropout(h (U * s_l)) U^T + b_l whose down- and up-projection are one matrix U [D, r] (symmetric),
shared by all blocks (one U for attention, one for the MLP); each block owns only its scales s_l [r] and bias
b_l [D]. At inference M = I + U diag(s_l) U^T and b_l fold into the next linear layer (qkv, fc1): no extra cost.
Trainable parameters (classifier excluded) on n adapted blocks: 2 D r + n (2 r + 2 D);
ViT-B/16 (D 768, 12 blocks), r=50: 76,800 + 12 x 1,636 = 96,432.
"""

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.methods.defaults import TrainingDefaults


class ArcConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str] = "adapted"  # trained through the backbone; build(config, vit, num_classes, tail_blocks)
    modes: ClassVar[tuple[str, ...]] = ("images", "tail")  # the first is the default

    name: Literal["arc"] = Field("arc", description="Method name: ARC, shared symmetric adapters recomposed per block.")
    rank: int = Field(
        50,
        ge=1,
        description="Bottleneck rank r: the columns of the shared projections U (paper and official code: 50); "
        "at most the backbone's embedding dimension.",
    )
    dropout: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Dropout between the down- and the up-projection of every adapter while training "
        "(official training scripts: 0.1).",
    )

    def training_defaults(self) -> TrainingDefaults:
        # The official VTAB-1k script (vtab_ARC_train.py): AdamW, lr 1e-2, weight decay 0, batch 32, 100 epochs,
        # cosine schedule after 10 warmup epochs, gradient norm clipped at 1.0 (`--max_grad_norm`), the head
        # zero-initialised (`zero_head=True`; Model/ARC_ViT.py); its FGVC script: lr 5e-3, wd 1e-2.
        return {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.0, "warmup_epochs": 10.0, "clip_grad_norm": 1.0}
