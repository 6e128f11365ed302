"""`"method": {"name": "auto"}`: not a method of its own, the choice between two for a user who does not know them.
The linear probe (by its cross-validated protocol) and LoSA (its automatic learning-rate grid) are trained from the
same feature cache, read once by the extraction both share; the one with the better validation figure becomes the
job's model, and the metrics compare them (services/training/auto.py). It has no model of its own, so it is not in
the registry's CONFIGS: a saved model is the chosen method's.
"""

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.methods.defaults import TrainingDefaults

CANDIDATES = ("linear", "losa")  # trained in this order, every setting default


class AutoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str] = "side"  # both candidates train on cached activations
    modes: ClassVar[tuple[str, ...]] = ("cache",)

    name: Literal["auto"] = Field(
        "auto",
        description="The linear probe and LoSA, each with its defaults, trained from one feature cache; the better "
        "on validation is kept (the probe's cross-validated figure against LoSA's validation figure).",
    )

    def candidates(self) -> list[dict]:
        """The method configs tried, as a job spec's `method`."""
        return [{"name": name} for name in CANDIDATES]

    def needs(self, num_layers: int, global_pool: str) -> tuple[list[int], tuple[str, ...]]:
        """What LoSA reads (every block it uses and every token), which holds what the probe reads."""
        from services.methods.losa.config import LosaConfig

        return LosaConfig().needs(num_layers, global_pool)

    def training_defaults(self) -> TrainingDefaults:
        return {}  # each candidate resolves its own
