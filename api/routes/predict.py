"""Predict with an adapted model: JSON with base64 images (or videos, for a model trained on clips), or a multipart
upload of image or video files (read as the model expects).

The only routes that load torch, and only on first use: the control plane stays light. Requests go through one
Batcher (services/batching.py), which runs concurrent requests as one backbone pass.
"""

from __future__ import annotations

import base64
import binascii
import threading
from typing import Annotated

from fastapi import APIRouter, File, Request, UploadFile

from api.deps import OwnerDep, SettingsDep, StoreDep
from api.errors import ApiError
from api.routes.models import own_model
from api.schemas import ErrorBody, PredictRequest, PredictResponse
from storage.settings import Settings

ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 413)}
router = APIRouter(prefix="/v1/models", tags=["predict"], responses=ERRORS)


_create = threading.Lock()  # two first requests at once must not load two Predictors


def _batcher(request: Request):
    state = request.app.state
    if getattr(state, "batcher", None) is None:
        with _create:
            if getattr(state, "batcher", None) is None:
                from services.batching import Batcher  # torch is imported here, on the first prediction
                from services.inference import Predictor

                state.predictor = Predictor(state.settings)
                state.batcher = Batcher.from_settings(state.predictor)
    return state.batcher


def _run(request: Request, model_id: str, images: list[bytes], settings: Settings, video: bool | None) -> dict:
    limit = settings.max_predict_images
    if len(images) > limit:
        raise ApiError(413, "too_many_images", f"{len(images)} images; at most {limit} per request")
    if video:  # each video within the clip size limit
        max_mb = settings.max_predict_video_mb
        for i, data in enumerate(images):
            if len(data) > max_mb * 2**20:
                raise ApiError(413, "video_too_large", f"instance {i}: {len(data) / 2**20:.1f} MB; at most {max_mb:g} "
                               "MB a video (SIDETUNE_MAX_PREDICT_VIDEO_MB)")  # fmt: skip
    from services.datasets import DatasetError

    try:
        predictions = _batcher(request).predict(model_id, images, video)
    except DatasetError as e:
        raise ApiError(400, "invalid_video" if video else "invalid_image", str(e)) from None
    return {"model_id": model_id, "predictions": predictions}


@router.post("/{model_id}:predict", response_model=PredictResponse)
def predict(model_id: str, body: PredictRequest, request: Request, store: StoreDep, owner: OwnerDep,
            settings: SettingsDep) -> dict:  # fmt: skip
    """Classify base64-encoded images, `{"instances": [{"image_b64": "..."}]}`, or videos for a model trained on
    clips, `{"instances": [{"video_b64": "..."}]}`."""
    own_model(store, model_id, owner)
    video = body.instances[0].video_b64 is not None
    images = []
    for i, inst in enumerate(body.instances):
        field = "video_b64" if inst.video_b64 is not None else "image_b64"
        if (field == "video_b64") != video:
            raise ApiError(400, "invalid_request", f"instances.{i}: one request holds images or videos, not both")
        try:
            images.append(base64.b64decode(getattr(inst, field), validate=True))
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_video" if video else "invalid_image",
                           f"instances.{i}.{field}: not valid base64") from None  # fmt: skip
    return _run(request, model_id, images, settings, video)


@router.post("/{model_id}:predict-files", response_model=PredictResponse)
async def predict_files(
    model_id: str,
    files: Annotated[
        list[UploadFile],
        File(
            description="Image files, or video files for a model trained on clips (multipart field `files`, "
            "repeatable)."
        ),
    ],
    request: Request,
    store: StoreDep,
    owner: OwnerDep,
    settings: SettingsDep,
) -> dict:
    """Classify uploaded image files (multipart/form-data), or video files for a model trained on clips."""
    model = own_model(store, model_id, owner)
    images = [await f.read() for f in files]
    from starlette.concurrency import run_in_threadpool

    video = True if model.get("video") else None  # a video model's files are videos (their size limit applies)
    return await run_in_threadpool(_run, request, model_id, images, settings, video)
