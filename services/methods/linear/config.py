"""Linear probe: a classifier on the frozen backbone's final representation (after the final norm).

The standard baseline of every adaptation paper (e.g. LoSA, Mercea et al., CVPR 2024, Table 1).
Trained from the feature cache; needs only the last layer.
"""

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

Pool = Literal["auto", "cls", "mean"]


class LinearConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str] = "side"  # trained on backbone activations; build(config, info: FeatureInfo)
    modes: ClassVar[tuple[str, ...]] = ("cache", "online")  # the first is the default

    name: Literal["linear"] = Field("linear", description="Method name: a linear probe.")
    pool: Pool = Field(
        "auto",
        description="Token pooling before the classifier: `cls` (class token), `mean` (mean of patch tokens), "
        "or `auto` (the backbone's own pooling).",
    )

    def training_defaults(self) -> dict:
        return {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 1e-4, "warmup_epochs": 1.0}
