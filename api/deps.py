"""Dependencies shared by the routes: settings, the job store, the Celery app, and the caller's identity."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Annotated

from celery import Celery
from fastapi import Depends, Path, Request

from api.errors import ApiError
from storage.jobs import JobStore, NotFound
from storage.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


def get_owner(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> str | None:
    """With API keys configured, a valid Bearer token is required; its hash identifies the owner of jobs and
    models. Without keys the API is open (and `sidetune api` binds to loopback)."""
    if not settings.api_keys:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token, k) for k in settings.api_keys):
        raise ApiError(401, "unauthorized", "a valid API key is required as `Authorization: Bearer <key>`")
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def owned(fetch: Callable[[str], dict], kind: str, record_id: str, owner: str | None) -> dict:
    """A job or model record visible to `owner`: records of other keys do not exist for the caller (404)."""
    try:
        record = fetch(record_id)
    except NotFound:
        record = None
    if record is None or record.get("owner") != owner:
        raise ApiError(404, "not_found", f"no {kind} {record_id!r}")
    return record


# Ids in paths, described once for the OpenAPI document.
JobId = Annotated[str, Path(description="The job's id (`job_...`), as `POST /jobs` returned it.")]
ModelId = Annotated[str, Path(description="The model's id (`model_...`), the `model_id` of the job that trained it.")]
DatasetId = Annotated[str, Path(description="The dataset's id (`ds_...`), as `POST /datasets` returned it.")]

SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
OwnerDep = Annotated[str | None, Depends(get_owner)]
