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

    def resolved_pool(self, global_pool: str) -> str:
        """`auto` -> the backbone's own pooling (`token` means the class token)."""
        if self.pool != "auto":
            return self.pool
        return "cls" if global_pool == "token" else "mean"

    def needs(self, num_layers: int, global_pool: str) -> tuple[list[int], tuple[str, ...]]:
        """The cached layers it reads and the token modes it accepts, smallest first: the last block's pooled
        token suffices, so a linear probe never forces a per-layer, per-token cache."""
        return [num_layers - 1], (self.resolved_pool(global_pool), "all")

    def training_defaults(self) -> dict:
        return {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 1e-4, "warmup_epochs": 1.0}
