"""Open Inference Protocol v2 (KServe v2 / Triton REST) on the inference service: health, server and model
metadata, model readiness, and infer (tensors in api/oip.py), so Triton and KServe clients (tritonclient[http])
work as they are. Errors answer in the protocol's shape, `{"error": "<message>"}` (api/errors.py). The same API keys
and owner isolation as the v1 routes: a model of another key does not exist (404). Like the v1 routes, they translate
HTTP only: the serving engine (services/serving/engine.py) loads, decodes and batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.deps import ModelId, ModelRecordDep, ServingDep, SettingsDep
from api.errors import ApiError
from api.oip import HEADER, InferRequest, ProtocolError, encode_response, model_metadata, parse_request
from services.modality.base import Kind
from services.serving.engine import Answer, Serving
from services.serving.requests import PredictError, record_kind

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

_ERROR = {"content": {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}}}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "enum": ["image", "pixels", "video"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["BYTES", "UINT8"]},
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "`inputs`: one tensor, `image` (BYTES [N]: base64 image files in JSON, raw bytes with the "
        "binary extension) or `pixels` (UINT8 [N, H, W, 3]), or `video` (BYTES [N]: video files) for a model trained "
        "on clips; optional `outputs` (`label`, `probabilities`) and "
        "`parameters.binary_data_output`. With the binary tensor extension the body is the JSON header, then the "
        "binary data, and the header `Inference-Header-Content-Length` gives the JSON's length.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 1},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.get("/health/live", responses={200: {"description": '`{"live": true}`'}})
async def live() -> dict:
    """The process is up."""
    return {"live": True}


@router.get("/health/ready", responses={200: {"description": '`{"ready": true}`'}, 503: _ERROR})
async def ready(request: Request) -> Any:
    """Ready to serve: the model registry (Redis) answers."""
    try:
        ok = await run_in_threadpool(request.app.state.store.ping)
    except Exception:
        ok = False
    return {"ready": True} if ok else JSONResponse({"ready": False}, status_code=503)


@router.get("", responses={200: {"description": "Server metadata."}})
async def server_metadata() -> dict:
    """The server's name, version and protocol extensions."""
    return {"name": "sidetune", "version": "0.1.0", "extensions": ["binary_tensor_data"]}


@router.get("/models/{model_id}", responses={200: {"description": "Model metadata."}, 401: _ERROR, 404: _ERROR})
async def metadata(model_id: ModelId, record: ModelRecordDep) -> dict:
    """Inputs (`image` BYTES [N], or `pixels` UINT8 [N, H, W, 3]) and outputs (`label` BYTES [N], `probabilities`
    FP32 [N, C]); `parameters.classes` lists the classes in output order."""
    return model_metadata(record)


@router.get("/models/{model_id}/ready", responses={200: {"description": "Ready."}, 404: _ERROR, 503: _ERROR})
async def model_ready(model_id: ModelId, record: ModelRecordDep, serving: ServingDep) -> dict:
    """Ready when its artifact is whole on the store (503 naming it otherwise)."""
    await run_in_threadpool(serving.predictor.artifacts.check_model, model_id)
    return {"name": model_id, "ready": True}


def _pictures(pixels: np.ndarray) -> list[Any]:
    """The `pixels` input ([N, H, W, 3] uint8) as RGB images."""
    from PIL import Image

    return [Image.fromarray(np.ascontiguousarray(im), "RGB") for im in pixels]


async def _answer(serving: Serving, model_id: str, parsed: InferRequest, kind: Kind) -> Answer:
    """The model's answer to a parsed request; an input it cannot take is a 4xx naming it (`input 'image': ...`)."""
    video_model = kind == "video"
    if video_model != (parsed.input == "video"):
        want = "`video` (video files)" if video_model else "`image` or `pixels`"
        raise ApiError(
            400,
            "invalid_request",
            f"input {parsed.input!r}: model {model_id} was trained on "
            f"{'videos' if video_model else 'images'}; send the input {want}",
        )
    try:
        if parsed.input == "pixels":
            return await serving.predict_decoded(model_id, await serving.in_decoder(_pictures, parsed.images))
        return await serving.predict(model_id, list(parsed.images), kind, "element")
    except PredictError as e:  # an undecodable image or video, too many pixels, a video too large: name the input
        if e.status not in (400, 413):
            raise
        raise ApiError(e.status, e.code, f"input {parsed.input!r}: {e}") from None


@router.post(
    "/models/{model_id}/infer",
    responses={
        200: {"description": "`outputs`: `label`, `probabilities`."},
        400: _ERROR,
        401: _ERROR,
        404: _ERROR,
        413: _ERROR,
        503: _ERROR,
    },
    openapi_extra=_INFER_BODY,
)
async def infer(
    model_id: ModelId, request: Request, record: ModelRecordDep, serving: ServingDep, settings: SettingsDep
) -> Response:
    """Classify images: the BYTES input `image` (encoded files) or the UINT8 input `pixels` ([N, H, W, 3]); or
    videos: the BYTES input `video` (encoded video files), for a model trained on clips."""
    body = await request.body()
    try:
        parsed = await serving.in_decoder(
            parse_request, body, request.headers.get(HEADER), settings.max_predict_images, settings.max_predict_pixels
        )
    except ProtocolError as e:
        raise ApiError(e.status, e.code, str(e)) from None
    answer = await _answer(serving, model_id, parsed, record_kind(record))
    content, headers = encode_response(model_id, parsed, answer.model.classes, answer.probs)
    return Response(content, headers=headers)
