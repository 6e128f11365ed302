"""`backbone.video`: how a timm image ViT becomes an unfactorised ViViT and how clips are sampled (torch-free).

ViViT (Arnab et al., ICCV 2021), model 1 ("spatio-temporal attention"): a clip of `num_frames` frames is cut into
tubelets of `tubelet` frames x p x p pixels, each embedded by a Conv3d inflated from the image model's patch
embedding; every token attends to every other. The LoSA paper (Mercea et al., CVPR 2024, sec. 4.3) adapts such
models built from image checkpoints on Kinetics-400 (32 frames, tubelet 2). The image model's spatial position
embeddings are repeated for every temporal index and nothing else tells the tubelets' times apart, so a frozen
ViViT is blind to temporal order: reversing a clip permutes its tokens, and the pooled output is the same (exactly so
under filter inflation). Only a side network's temporal mixer (LoSA's Eq. 6) sees the order.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class VideoSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_frames: int = Field(16, ge=1, le=512, description="Frames per clip T (the LoSA paper: 32).")
    tubelet: int = Field(
        2, ge=1, le=64, description="Frames per tubelet t; the clip has T' = T / t temporal positions (paper: 2)."
    )
    init: Literal["central_frame", "filter_inflation"] = Field(
        "central_frame",
        description="How the Conv3d tubelet embedding is made from the 2D patch embedding: `central_frame` (the 2D "
        "weights at temporal index t//2, zeros elsewhere: ViViT's default; each tubelet sees one frame) or "
        "`filter_inflation` (the 2D weights / t at every temporal index: each tubelet sees the mean of its frames).",
    )
    sampling: Literal["uniform", "strided"] = Field(
        "uniform",
        description="Which frames make the clip: `uniform` (T frames evenly spread over the whole video or its "
        "span, one per equal segment) or `strided` (T consecutive frames every `frame_stride`-th, centred). "
        "The feature cache holds one deterministic clip per video (segment centres, centred window); `online` "
        "training jitters it (a random frame per segment, a random window).",
    )
    frame_stride: int = Field(2, ge=1, le=64, description="With `strided` sampling: take every k-th frame.")

    @model_validator(mode="after")
    def _whole_tubelets(self) -> VideoSpec:
        if self.num_frames % self.tubelet:
            raise ValueError(
                f"video.num_frames ({self.num_frames}) must be a multiple of video.tubelet ({self.tubelet})"
            )
        return self

    @property
    def temporal_positions(self) -> int:
        """T' = T / t: the temporal positions of the token grid."""
        return self.num_frames // self.tubelet

    @property
    def frames_needed(self) -> int:
        """Frames a video needs for a clip without repeated frames."""
        return self.num_frames if self.sampling == "uniform" else (self.num_frames - 1) * self.frame_stride + 1
