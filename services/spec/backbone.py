"""`backbone` of a job spec: the frozen timm ViT, its weights, input size, precision, and video settings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.architectures import unsupported_backbone
from services.errors import SpecError
from services.spec.fields import NO_NUL, SEED_MAX
from services.video.spec import VideoSpec


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
        None,
        pattern=NO_NUL,
        description="A local safetensors checkpoint inside an allowed root; overrides `pretrained`.",
    )
    image_size: int | None = Field(
        None,
        ge=16,
        le=1024,
        description="Input size in pixels; default: the backbone's own (position embeddings are resampled).",
    )
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
