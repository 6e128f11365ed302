"""Predict with an adapted model (v1): JSON with base64 images, or a multipart upload of image files; for a model
trained on videos, base64 videos (`video_b64`) or video files. Served by the inference service (api/inference.py);
the API forwards these paths to it (api/routes/forward.py).

The routes are async and park no thread while a request waits: a cold model is loaded in the loader pool (never on the
batching thread, so warm models keep answering); then the images' pixels are counted from their headers against the
request's budget (`max_predict_pixels`, 413 `too_many_pixels`) and they are decoded in a small decoder pool as the
model's training images were (services/data/images.py; videos as its clips were sampled); the request then awaits
its rows of a batch (services/serving/batching.py). `run_model` and `run_videos` are shared with the v2 routes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ctypes
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, File, Query, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from api.deps import ModelId, OwnerDep, SettingsDep
from api.errors import ApiError
from api.routes.models import own_model
from api.schemas import ErrorBody, Instance, PredictRequest, PredictResponse
from services.data.datasets import DatasetError
from services.data.images import ImageError, TooManyPixels, check_budget, draft_size

TRIM_PIXELS = 16_000_000  # a request that decoded this many pixels hands the freed memory back to the OS

ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 503)}
router = APIRouter(prefix="/v1/models", tags=["predict"], responses=ERRORS)


async def off_loop(request: Request, pool: str, fn: Callable, *args: Any) -> Any:
    """`fn(*args)` in one of the app's thread pools (`decoder` or `loader`), awaited."""
    return await asyncio.get_running_loop().run_in_executor(getattr(request.app.state, pool), fn, *args)


async def own(request: Request, model_id: str, owner: str | None) -> dict:
    """The model's record, if the caller may use it (404 otherwise); Redis is read off the event loop."""
    return await run_in_threadpool(own_model, request.app.state.store, model_id, owner)


async def load_model(request: Request, model_id: str) -> Any:
    """The loaded model. A model not in the store is 503 naming it (its record exists); one not whole there is 503
    `store_incomplete`, never half-loaded."""
    predictor = request.app.state.predictor
    model = predictor.cached(model_id)
    if model is None:
        try:
            model = await off_loop(request, "loader", predictor.load, model_id)
        except FileNotFoundError as e:
            raise ApiError(
                503,
                "model_unavailable",
                f"model {model_id!r} is registered but not in the store: {e}",
                {"Retry-After": "5"},
            ) from None
    return model


async def run_model(request: Request, model_id: str, images: list[bytes] | list[Any]) -> tuple[Any, Any]:
    """(the loaded model, class probabilities [n, classes]) for encoded images (bytes: checked against the request's
    pixel budget from their headers, then decoded as the model's loaders decoded its training images) or decoded
    ones (PIL images)."""
    model = await load_model(request, model_id)
    encoded = bool(images) and isinstance(images[0], bytes | bytearray)
    pixels = 0
    if encoded:
        pixels = await off_loop(request, "decoder", _budget, images, request.app.state.settings.max_predict_pixels)
        images = await off_loop(
            request, "decoder", _decoded, request.app.state.predictor, images, draft_size(model.backbone.transform)
        )
    try:
        return model, await asyncio.wrap_future(request.app.state.batcher.submit(model, images))
    finally:
        del images
        if pixels >= TRIM_PIXELS:
            await off_loop(request, "decoder", release_memory)


def _budget(images: list[bytes], budget: int) -> int:
    try:
        return check_budget(images, budget)
    except ImageError as e:
        raise ApiError(e.status if isinstance(e, TooManyPixels) else 400, e.code, str(e)) from None


def release_memory() -> None:
    """Hand the heap pages that a large request's decoded images freed back to the OS: glibc keeps them in its arenas
    otherwise (a process that once decoded gigabytes would keep them)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def check_videos(items: list[bytes], settings: Any, what: str = "instance") -> None:
    """413 `video_too_large` for a video over SIDETUNE_MAX_PREDICT_VIDEO_MB."""
    max_mb = settings.max_predict_video_mb
    for i, data in enumerate(items):
        if len(data) > max_mb * 2**20:
            raise ApiError(
                413,
                "video_too_large",
                f"{what} {i}: {len(data) / 2**20:.1f} MB; at most {max_mb:g} MB a "
                "video (SIDETUNE_MAX_PREDICT_VIDEO_MB)",
            )


def _decoded_for(predictor: Any, model: Any, items: list[bytes], video: bool | None) -> list[Any]:
    try:
        return predictor.decode_for(model, items, video)
    except DatasetError as e:
        from services.video.serving import is_video_model

        raise ApiError(400, "invalid_video" if is_video_model(model.config) else "invalid_image", str(e)) from None


async def run_videos(request: Request, model_id: str, items: list[bytes], video: bool | None) -> tuple[Any, Any]:
    """(the loaded model, class probabilities) for encoded inputs of a model that may take videos: loaded first,
    then decoded as it takes them (`video`: what the client said it sent; a mismatch is 400)."""
    model = await load_model(request, model_id)
    decoded = await off_loop(request, "decoder", _decoded_for, request.app.state.predictor, model, items, video)
    return model, await asyncio.wrap_future(request.app.state.batcher.submit(model, decoded))


def _raw(instances: list[Instance]) -> tuple[list[bytes], bool]:
    """The instances' bytes and whether they are videos (a request holds one kind)."""
    video = instances[0].video_b64 is not None
    items = []
    for i, inst in enumerate(instances):
        field = "video_b64" if inst.video_b64 is not None else "image_b64"
        if (field == "video_b64") != video:
            raise ApiError(400, "invalid_request", f"instances.{i}: one request holds images or videos, not both")
        try:
            items.append(base64.b64decode(getattr(inst, field), validate=True))
        except (binascii.Error, ValueError):
            raise ApiError(
                400, "invalid_video" if video else "invalid_image", f"instances.{i}.{field}: not valid base64"
            ) from None
    return items, video


def _decoded(predictor: Any, images: list[bytes], draft: int | None = None) -> list[Any]:
    try:
        return predictor.decode(images, draft)
    except DatasetError as e:
        raise ApiError(400, "invalid_image", str(e)) from None


def _check_threshold(record: dict, threshold: float | None) -> None:
    if threshold is not None and not record.get("multi_label"):
        raise ApiError(
            422,
            "invalid_request",
            f"threshold: model {record['id']!r} is single-label (one class per "
            "input, the most probable); a threshold applies to multi-label models only",
        )


def _check_count(n: int, limit: int) -> None:
    if n > limit:
        raise ApiError(413, "too_many_images", f"{n} images; at most {limit} per request")


@router.post("/{model_id}:predict", response_model=PredictResponse)
async def predict(
    model_id: ModelId, body: PredictRequest, request: Request, owner: OwnerDep, settings: SettingsDep
) -> dict:
    """Classify base64-encoded images, `{"instances": [{"image_b64": "..."}]}`, or videos for a model trained on
    clips, `{"instances": [{"video_b64": "..."}]}`."""
    record = await own(request, model_id, owner)
    _check_count(len(body.instances), settings.max_predict_images)
    _check_threshold(record, body.threshold)
    if record.get("video") is not None or any(inst.video_b64 is not None for inst in body.instances):
        items, video = _raw(body.instances)
        if video:
            check_videos(items, settings)
        model, probs = await run_videos(request, model_id, items, video)
    else:
        images = await off_loop(request, "decoder", lambda: _raw(body.instances)[0])
        model, probs = await run_model(request, model_id, images)
    predictions = request.app.state.predictor.format(model, probs, body.threshold, body.top_k)
    return {"model_id": model_id, "predictions": predictions}


@router.post("/{model_id}:predict-files", response_model=PredictResponse)
async def predict_files(
    model_id: ModelId,
    files: Annotated[
        list[UploadFile],
        File(description="Image files, or video files for a model trained on clips (multipart field `files`)."),
    ],
    request: Request,
    owner: OwnerDep,
    settings: SettingsDep,
    threshold: Annotated[
        float | None,
        Query(
            ge=0.0,
            le=1.0,
            allow_inf_nan=False,
            description="Multi-label models: the tag threshold (default: the model's); single-label ones refuse it.",
        ),
    ] = None,
    top_k: Annotated[
        int | None,
        Query(ge=1, description="Return only the `top_k` highest scores of each file (default: every class's)."),
    ] = None,
) -> dict:
    """Classify uploaded image files (multipart/form-data), or video files for a model trained on clips."""
    record = await own(request, model_id, owner)
    _check_count(len(files), settings.max_predict_images)
    _check_threshold(record, threshold)
    raw = [await f.read() for f in files]
    if record.get("video") is not None:  # the model's files are videos
        check_videos(raw, settings, "file")
        model, probs = await run_videos(request, model_id, raw, None)
        return {"model_id": model_id, "predictions": request.app.state.predictor.format(model, probs, threshold, top_k)}
    model, probs = await run_model(request, model_id, raw)
    return {"model_id": model_id, "predictions": request.app.state.predictor.format(model, probs, threshold, top_k)}
