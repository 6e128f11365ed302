"""Predict on video: a model trained on clips decodes its inputs exactly as its training data was: the same PyAV
decoding, the deterministic clip of the cache (segment centres, or the centred window), each frame through the
backbone's eval steps. Runs in the caller's thread (PyAV and Pillow, no torch ops), like image decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from services.datasets import DatasetError
from services.video.decoding import read_clip
from services.video.loading import clip_transform
from services.video.spec import VideoSpec

ClipDecoder = Callable[[bytes, str], np.ndarray]  # (file bytes, name for errors) -> uint8 [T, H, W, 3]


def clip_decoder(config: dict[str, Any], max_seconds: float | None) -> ClipDecoder | None:
    """How the model of `config` (its artifact's config) decodes a video; None for a model trained on images."""
    video = config["backbone"].get("video")
    if video is None:
        return None
    from timm.data import create_transform

    from services.backbones import SplitTransform

    spec = VideoSpec.model_validate(video)
    split = SplitTransform.of(create_transform(**config["data_config"], is_training=False))
    frames = clip_transform(config["data_config"], split.pil).for_clip(None)
    return lambda data, name: read_clip(data, spec, frames, max_seconds=max_seconds, name=name).frames


def decode_inputs(
    items: list[bytes], decoder: ClipDecoder | None, video: bool | None, model_id: str, decode_image: Callable
) -> list[Any]:
    """Each input as the model takes it: clips (uint8 arrays) for a video model, PIL images otherwise. `video`: what
    the client said it sends (`video_b64` or `image_b64`), None when it did not say (files); a mismatch with the
    model is a DatasetError naming it."""
    if decoder is None:
        if video:
            raise DatasetError(f"model {model_id} was trained on images: send `image_b64`, not `video_b64`")
        return [decode_image(i, data) for i, data in enumerate(items)]
    if video is False:
        raise DatasetError(f"model {model_id} was trained on videos: send `video_b64`, not `image_b64`")
    return [decoder(data, f"instance {i}") for i, data in enumerate(items)]
