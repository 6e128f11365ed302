"""Predict with an adapted model: JSON with base64 images, or a multipart upload of image files.

The only routes that load torch, and only on first use: the control plane stays light. Requests go through one
Batcher (services/batching.py), which runs concurrent requests as one backbone pass.
"""

from __future__ import annotations

import base64
import binascii
import threading
from typing import Annotated

from fastapi import APIRouter, File, Query, Request, UploadFile

from api.deps import OwnerDep, SettingsDep, StoreDep
from api.errors import ApiError
from api.routes.models import own_model
from api.schemas import ErrorBody, PredictRequest, PredictResponse

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


def _run(request: Request, model_id: str, images: list[bytes], limit: int, threshold: float | None = None) -> dict:
    if len(images) > limit:
        raise ApiError(413, "too_many_images", f"{len(images)} images; at most {limit} per request")
    from services.datasets import DatasetError

    try:
        predictions = _batcher(request).predict(model_id, images, threshold)
    except DatasetError as e:
        raise ApiError(400, "invalid_image", str(e)) from None
    return {"model_id": model_id, "predictions": predictions}


@router.post("/{model_id}:predict", response_model=PredictResponse)
def predict(model_id: str, body: PredictRequest, request: Request, store: StoreDep, owner: OwnerDep,
            settings: SettingsDep) -> dict:  # fmt: skip
    """Classify base64-encoded images: `{"instances": [{"image_b64": "..."}]}`."""
    own_model(store, model_id, owner)
    images = []
    for i, inst in enumerate(body.instances):
        try:
            images.append(base64.b64decode(inst.image_b64, validate=True))
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_image", f"instances.{i}.image_b64: not valid base64") from None
    return _run(request, model_id, images, settings.max_predict_images, body.threshold)


@router.post("/{model_id}:predict-files", response_model=PredictResponse)
async def predict_files(
    model_id: str,
    files: Annotated[list[UploadFile], File(description="Image files (multipart field `files`, repeatable).")],
    request: Request,
    store: StoreDep,
    owner: OwnerDep,
    settings: SettingsDep,
    threshold: Annotated[
        float | None, Query(ge=0.0, le=1.0, description="Multi-label models: the tag threshold (default: the model's).")
    ] = None,
) -> dict:
    """Classify uploaded image files (multipart/form-data)."""
    own_model(store, model_id, owner)
    images = [await f.read() for f in files]
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_run, request, model_id, images, settings.max_predict_images, threshold)
