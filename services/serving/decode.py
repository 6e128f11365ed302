"""Decoding a predict request's files as the model's training data was decoded, in the inference service's decoder
pool (Pillow and PyAV, no torch ops): each model's modality (services/modality/) checks what the client sent and the
request's limits (images: the pixel budget from their headers; videos: their size), then decodes them (images as the
loaders decode them, drafted down; clips sampled as the model's were); and handing a large request's freed memory
back to the OS. Failures are `PredictError`s naming the instance."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from services.data.datasets import DatasetError
from services.errors import UserError
from services.serving.requests import PredictError

if TYPE_CHECKING:
    from services.modality.base import Kind
    from services.serving.loaded import LoadedModel
    from storage.settings import Settings

TRIM_PIXELS = 16_000_000  # a request that decoded this many pixels hands the freed memory back to the OS


def check(models: list[LoadedModel], items: list[bytes], sent: Kind | None, settings: Settings, what: str) -> int:
    """Refuse a payload of another kind than the models take (`sent`: what the client said it sent; None: files,
    taken as what the models take), then check it against the request's limits; returns the pixels it holds.
    One request's models take one kind (services/serving/requests.py: check_one_kind)."""
    for model in models:
        _refusing(model, model.modality.check_sent, model.id, sent)
    try:
        return models[0].modality.check_payload(items, settings, what)
    except UserError as e:  # 413 over a limit of the request's, 400 for a file that cannot be read
        raise PredictError(str(e), e.code, e.status if e.status == 413 else 400) from None


def decoding(model: LoadedModel) -> Hashable:
    """What decoding a model's inputs depends on: models with equal keys take the very same decoded inputs (images:
    the draft size, which follows the backbone's resize; clips: the backbone and the clip sampling)."""
    return model.modality.decoding_key(model.backbone_key, model.backbone)


def for_model(model: LoadedModel, items: list[bytes], max_seconds: float) -> list[Any]:
    """Encoded inputs as a loaded model takes them: PIL images, or clips (uint8 [T, H, W, 3]) for a model trained on
    videos. 400 `invalid_video` or `invalid_image` naming the instance that could not be decoded."""
    return _refusing(model, model.modality.decode, model.backbone, items, max_seconds)


def _refusing(model: LoadedModel, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, a DatasetError as the 400 of the model's kind (`invalid_image`, `invalid_video`)."""
    try:
        return fn(*args)
    except DatasetError as e:
        raise PredictError(str(e), model.modality.invalid) from None


def release_memory() -> None:
    """Hand the heap pages that a large request's decoded images freed back to the OS: glibc keeps them in its arenas
    otherwise (a process that once decoded gigabytes would keep them)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
