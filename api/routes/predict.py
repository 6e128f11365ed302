"""Predict with an adapted model (v1): JSON with base64 images, or a multipart upload of image files; for a model
trained on videos, base64 videos (`video_b64`) or video files. Served by the inference service (api/inference.py);
the API forwards these paths to it (api/routes/forward.py).

The routes are async and park no thread while a request waits: images are decoded in a small decoder pool, a cold
model is loaded in the loader pool (never on the batching thread, so warm models keep answering), and the request
then awaits its rows of a batch (services/batching.py). Videos are decoded after the model is loaded (its config says
how its clips are sampled), in the decoder pool too. `run_model` and `run_videos` are shared with the v2 routes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, File, Query, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from api.deps import ModelId, OwnerDep, SettingsDep
from api.errors import ApiError
from api.routes.models import own_model
from api.schemas import ErrorBody, Instance, PredictRequest, PredictResponse
from services.datasets import DatasetError

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
            raise ApiError(503, "model_unavailable", f"model {model_id!r} is registered but not in the store: {e}",
                           {"Retry-After": "5"}) from None  # fmt: skip
    return model


async def run_model(request: Request, model_id: str, images: list[Any]) -> tuple[Any, Any]:
    """(the loaded model, class probabilities [n, classes]) for decoded images."""
    model = await load_model(request, model_id)
    return model, await asyncio.wrap_future(request.app.state.batcher.submit(model, images))


def check_videos(items: list[bytes], settings: Any, what: str = "instance") -> None:
    """413 `video_too_large` for a video over SIDETUNE_MAX_PREDICT_VIDEO_MB."""
    max_mb = settings.max_predict_video_mb
    for i, data in enumerate(items):
        if len(data) > max_mb * 2**20:
            raise ApiError(413, "video_too_large", f"{what} {i}: {len(data) / 2**20:.1f} MB; at most {max_mb:g} MB a "
                           "video (SIDETUNE_MAX_PREDICT_VIDEO_MB)")  # fmt: skip


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
            raise ApiError(400, "invalid_video" if video else "invalid_image",
                           f"instances.{i}.{field}: not valid base64") from None  # fmt: skip
    return items, video


def _decode(predictor: Any, instances: list[Instance]) -> list[Any]:
    return _decoded(predictor, _raw(instances)[0])


def _decoded(predictor: Any, images: list[bytes]) -> list[Any]:
    try:
        return predictor.decode(images)
    except DatasetError as e:
        raise ApiError(400, "invalid_image", str(e)) from None


def _check_count(n: int, limit: int) -> None:
    if n > limit:
        raise ApiError(413, "too_many_images", f"{n} images; at most {limit} per request")


@router.post("/{model_id}:predict", response_model=PredictResponse)
async def predict(model_id: ModelId, body: PredictRequest, request: Request, owner: OwnerDep,
                  settings: SettingsDep) -> dict:  # fmt: skip
    """Classify base64-encoded images, `{"instances": [{"image_b64": "..."}]}`, or videos for a model trained on
    clips, `{"instances": [{"video_b64": "..."}]}`."""
    record = await own(request, model_id, owner)
    _check_count(len(body.instances), settings.max_predict_images)
    if record.get("video") is not None or any(inst.video_b64 is not None for inst in body.instances):
        items, video = _raw(body.instances)
        if video:
            check_videos(items, settings)
        model, probs = await run_videos(request, model_id, items, video)
        return {"model_id": model_id, "predictions": request.app.state.predictor.format(model, probs)}
    images = await off_loop(request, "decoder", _decode, request.app.state.predictor, body.instances)
    model, probs = await run_model(request, model_id, images)
    return {"model_id": model_id, "predictions": request.app.state.predictor.format(model, probs, body.threshold)}


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
        float | None, Query(ge=0.0, le=1.0, description="Multi-label models: the tag threshold (default: the model's).")
    ] = None,
) -> dict:
    """Classify uploaded image files (multipart/form-data), or video files for a model trained on clips."""
    record = await own(request, model_id, owner)
    _check_count(len(files), settings.max_predict_images)
    raw = [await f.read() for f in files]
    if record.get("video") is not None:  # the model's files are videos
        check_videos(raw, settings, "file")
        model, probs = await run_videos(request, model_id, raw, None)
        return {"model_id": model_id, "predictions": request.app.state.predictor.format(model, probs)}
    images = await off_loop(request, "decoder", _decoded, request.app.state.predictor, raw)
    model, probs = await run_model(request, model_id, images)
    return {"model_id": model_id, "predictions": request.app.state.predictor.format(model, probs, threshold)}
