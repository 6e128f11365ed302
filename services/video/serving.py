"""Predict on video: a model trained on clips decodes its inputs exactly as its training data was: the same PyAV
decoding, the deterministic clip of the cache (segment centres, or the centred window), each frame through the
backbone's eval steps. PyAV and Pillow only (no torch ops), so it runs where images are decoded: the inference
service's decoder pool. The model must be loaded first: its config says how its clips are sampled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.data.datasets import DatasetError
from services.video.decoding import read_clip
from services.video.loading import clip_transform
from services.video.spec import VideoSpec


def is_video_model(config: dict[str, Any]) -> bool:
    return config["backbone"].get("video") is not None


def decode_clips(config: dict[str, Any], backbone: Any, items: list[bytes], max_seconds: float | None) -> list[Any]:
    """The clips (uint8 [T, H, W, 3]) of video files for the model of `config` on `backbone`; a DatasetError names
    the instance that could not be decoded (VideoTooLong: over `max_seconds`)."""
    spec = VideoSpec.model_validate(config["backbone"]["video"])
    frames = clip_transform(backbone.data_config, backbone.split.pil).for_clip(None)
    return [
        read_clip(data, spec, frames, max_seconds=max_seconds, name=f"instance {i}").frames
        for i, data in enumerate(items)
    ]


def decode_for(
    model_id: str,
    config: dict[str, Any],
    backbone: Any,
    items: list[bytes],
    video: bool | None,
    decode_images: Callable[[list[bytes]], list[Any]],
    max_seconds: float | None,
) -> list[Any]:
    """Each input as the model takes it: clips for a video model, PIL images otherwise. `video`: what the client
    said it sent (`video_b64`/`video` or `image_b64`/`image`), None when it did not say (files); a mismatch with the
    model is a DatasetError naming it."""
    if not is_video_model(config):
        if video:
            raise DatasetError(f"model {model_id} was trained on images: send images, not videos")
        return decode_images(items)
    if video is False:
        raise DatasetError(
            f"model {model_id} was trained on videos: send videos (`video_b64`, the v2 input `video`), not images"
        )
    return decode_clips(config, backbone, items, max_seconds)
