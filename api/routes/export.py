"""Export a model: `GET /models/{id}/export?format=timm|onnx|adapter|mlflow|hf`, served by the inference service
(torch is needed: the model is built in float32 on the CPU and written out by services/export/), to which the API
forwards the path (api/routes/forward.py), so clients use either URL. One export at a time runs, in the `exporter`
thread, so exports never hold up predict's model loads. The file is written to a temporary folder, streamed, then
removed.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from api.deps import ModelId, OwnerDep, SettingsDep
from api.errors import ApiError
from api.routes.models import own_model_or_why
from api.schemas import ErrorBody
from services.export import FORMATS, ExportFormat
from storage.artifacts import ArtifactStore

router = APIRouter(prefix="/models", tags=["models"], responses={401: {"model": ErrorBody}})

_FORMATS = "; ".join(f"`{name}`: {f.description}" for name, f in FORMATS.items())


@router.get(
    "/{model_id}/export",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/zip": {}, "application/octet-stream": {}},
            "description": "The export: a zip (`timm`, `adapter`, `mlflow`, `hf`) or an .onnx file, named in "
            "Content-Disposition.",
        },
        404: {"model": ErrorBody},
        409: {"model": ErrorBody, "description": "The model's job failed, was cancelled or has not finished."},
        422: {"model": ErrorBody, "description": "An unknown format, or one this model cannot be exported in."},
        503: {"model": ErrorBody},
    },
)
async def export_model(
    model_id: ModelId,
    request: Request,
    owner: OwnerDep,
    settings: SettingsDep,
    fmt: Annotated[ExportFormat, Query(alias="format", description=f"The format. {_FORMATS}.")],
) -> FileResponse:
    """Download the model in a format to deploy it with, built from its artifact in float32 (exact: the logits
    equal predict's up to float rounding). Refused with the cause: 404 no such model, 409 its job failed or has not
    finished, 422 a format this model cannot take (e.g. `timm` for LoSA or a video model)."""
    await run_in_threadpool(own_model_or_why, request.app.state.store, model_id, owner)
    from services.export import ExportError, export_model  # torch, in the inference service only

    folder = Path(tempfile.mkdtemp(prefix=f"export-{model_id}-"))
    try:
        artifacts = ArtifactStore.from_settings(settings)
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(
            request.app.state.exporter, export_model, artifacts, settings, model_id, fmt, folder
        )
    except BaseException as e:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(e, ExportError):
            raise ApiError(422, "export_unsupported", f"model {model_id!r} cannot be exported as {fmt}: {e}") from None
        if isinstance(e, FileNotFoundError):
            raise ApiError(
                503,
                "model_unavailable",
                f"model {model_id!r} is registered but not in the store: {e}",
                {"Retry-After": "5"},
            ) from None
        raise
    return FileResponse(
        out.path,
        media_type=out.media_type,
        filename=out.filename,
        background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True),
    )
