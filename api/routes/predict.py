"""Predict with adapted models (v1), on the inference service (api/inference.py; the API forwards these paths to it:
api/routes/forward.py): JSON with base64 images, or a multipart upload of image files, for one model; for a model
trained on videos, base64 videos (`video_b64`) or video files; and `POST /v1/predict`, one request for several models.

The routes translate HTTP only: they check what the request may hold (services/serving/requests.py), call the serving
engine (services/serving/engine.py: loading, the pixel budget, decoding, batching) and build the response. Errors are
typed (`PredictError`, with their status and code), answered by api/errors.py.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from api.deps import ModelId, OwnerDep, ServingDep, SettingsDep, StoreDep, get_model_record, owned
from api.schemas import ErrorBody, MultiPredictRequest, MultiPredictResponse, PredictRequest, PredictResponse
from services.serving.requests import (
    check_count,
    check_models,
    check_one_kind,
    check_threshold,
    record_kind,
)

ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 503)}
router = APIRouter(prefix="/v1", tags=["predict"], responses=ERRORS)


@router.post("/models/{model_id}:predict", response_model=PredictResponse)
async def predict(
    model_id: ModelId,
    body: PredictRequest,
    store: StoreDep,
    owner: OwnerDep,
    serving: ServingDep,
    settings: SettingsDep,
) -> dict:
    """Classify base64-encoded images, `{"instances": [{"image_b64": "..."}]}`, or videos for a model trained on
    clips, `{"instances": [{"video_b64": "..."}]}`."""
    record = await get_model_record(model_id, store, owner)  # after the body's validation: a bad body is 422 first
    check_count(len(body.instances), settings.max_predict_images)
    check_threshold([record], body.threshold)
    answer = await serving.predict(model_id, body.instances)
    return {"model_id": model_id, "predictions": serving.predictions(answer, body.threshold, body.top_k)}


@router.post("/models/{model_id}:predict-files", response_model=PredictResponse)
async def predict_files(
    model_id: ModelId,
    files: Annotated[
        list[UploadFile],
        File(description="Image files, or video files for a model trained on clips (multipart field `files`)."),
    ],
    store: StoreDep,
    owner: OwnerDep,
    serving: ServingDep,
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
    record = await get_model_record(model_id, store, owner)  # after the query's validation: a bad one is 422 first
    check_count(len(files), settings.max_predict_images)
    check_threshold([record], threshold)
    raw = [await f.read() for f in files]
    answer = await serving.predict(model_id, raw, record_kind(record), "file")  # a video model's files are videos
    return {"model_id": model_id, "predictions": serving.predictions(answer, threshold, top_k)}


@router.post(
    "/predict",
    response_model=MultiPredictResponse,
    responses={422: {"model": ErrorBody, "description": "An empty `models`, a model listed twice, too many."}},
)
async def predict_many(
    body: MultiPredictRequest, serving: ServingDep, settings: SettingsDep, store: StoreDep, owner: OwnerDep
) -> dict:
    """Classify base64-encoded images (or videos) with several models at once, `{"models": ["model_a", "model_b"],
    "instances": [{"image_b64": "..."}]}`: the inputs are decoded once and pass through each backbone once for every
    model on it. The answer holds each model's predictions, in the order of `models`."""
    check_models(body.models, settings.max_predict_models)
    check_count(len(body.instances), settings.max_predict_images)
    records = [await run_in_threadpool(owned, store.get_model, "model", m, owner) for m in body.models]
    check_threshold(records, body.threshold)
    check_one_kind(records)
    answers = await serving.predict_many(body.models, body.instances)
    return {
        "results": [
            {"model_id": a.model.id, "predictions": serving.predictions(a, body.threshold, body.top_k)} for a in answers
        ]
    }
