"""Decoding a predict request's files as the model's training data was decoded, in the inference service's decoder
pool (Pillow and PyAV, no torch ops): the pixel budget from the images' headers first, then images (JPEGs far larger
than the backbone's input drafted down, as the loaders do: services/data/images.py) or, for a model trained on clips,
videos sampled as its clips were (services/video/serving.py); and handing a large request's freed memory back to the
OS. Failures are `PredictError`s naming the instance."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Hashable
from typing import Any

from services.data.datasets import DatasetError, load_image
from services.data.images import ImageError, check_budget, draft_size
from services.serving.requests import PredictError

TRIM_PIXELS = 16_000_000  # a request that decoded this many pixels hands the freed memory back to the OS


def pixels(images: list[bytes], budget: int) -> int:
    """The pixels of encoded images from their headers: 400 for an unreadable header or an image over the per-image
    limit, 413 `too_many_pixels` over the request's `budget` (SIDETUNE_MAX_PREDICT_PIXELS)."""
    try:
        return check_budget(images, budget)
    except ImageError as e:
        raise PredictError(str(e), e.code, e.status if e.status == 413 else 400) from None


def images(data: list[bytes], draft: int | None = None) -> list[Any]:
    """PIL images; 400 `invalid_image` naming the instance that could not be decoded."""
    decoded = []
    for i, item in enumerate(data):
        try:
            decoded.append(load_image(item, draft))
        except DatasetError as e:
            raise PredictError(f"instance {i}: {e}", "invalid_image") from None
    return decoded


def is_video_model(model: Any) -> bool:
    return model.manifest.backbone.video is not None


def decoding(model: Any) -> Hashable:
    """What decoding a model's inputs depends on: models with equal keys take the very same decoded inputs (images:
    the draft size, which follows the backbone's resize; clips: the backbone and the clip sampling)."""
    if is_video_model(model):
        return ("video", model.backbone_key, model.manifest.backbone.video.model_dump_json())
    return ("image", draft_size(model.backbone.transform))


def for_model(model: Any, items: list[bytes], video: bool | None, max_seconds: float) -> list[Any]:
    """Encoded inputs as a loaded model takes them: PIL images, or clips (uint8 [T, H, W, 3]) for a model trained on
    videos; `video` is what the client said it sent (None: files, as the model expects). 400 `invalid_video` or
    `invalid_image` naming the instance that could not be decoded or does not suit the model."""
    from services.video.serving import decode_for  # PyAV: in the inference service only

    draft = draft_size(model.backbone.transform)
    try:
        return decode_for(model.id, model.config, model.backbone, items, video, lambda d: images(d, draft), max_seconds)
    except DatasetError as e:
        raise PredictError(str(e), "invalid_video" if is_video_model(model) else "invalid_image") from None


def release_memory() -> None:
    """Hand the heap pages that a large request's decoded images freed back to the OS: glibc keeps them in its arenas
    otherwise (a process that once decoded gigabytes would keep them)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
