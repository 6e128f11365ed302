"""Dependencies shared by the routes: settings, the job store, the Celery app, the caller's identity, the caller's
model record, and (in the inference service) the serving engine."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Annotated, TypeVar

from celery import Celery
from fastapi import Depends, Path, Request
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError
from services.serving.engine import Serving
from storage.redis import DatasetRecord, JobRecord, JobStore, ModelRecord, NotFound
from storage.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


async def get_serving(request: Request) -> Serving:
    """The inference service's serving engine (built by its lifespan: api/inference.py)."""
    return request.app.state.serving


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


def _token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" else ""


def _one_of(token: str, keys: list[str]) -> bool:
    # every key compared (no early exit), each in constant time; as bytes, since compare_digest refuses a str with
    # non-ASCII characters: the header's bytes (Starlette decodes them as latin-1) against the key's UTF-8
    given = token.encode("latin-1")
    return bool(token) and sum(hmac.compare_digest(given, k.encode()) for k in keys) > 0


def owner_of(token: str) -> str:
    """The owner id of a key: its hash, as jobs, models and datasets record it."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


async def get_owner(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> str | None:
    """With API keys configured, a valid Bearer token is required (an API key or an admin key); its hash identifies
    the owner of jobs and models. Without keys the API is open (and `sidetune api` binds to loopback)."""
    keys = settings.all_keys
    if not keys:
        return None
    token = _token(request)
    if not _one_of(token, keys):
        raise ApiError(401, "unauthorized", "a valid API key is required as `Authorization: Bearer <key>`")
    return owner_of(token)


def is_admin(request: Request, settings: Settings) -> bool:
    """Whether the caller may use operator routes: an admin key, or anyone when the API has no keys at all."""
    if not settings.all_keys:
        return True
    return _one_of(_token(request), settings.admin_keys)


async def require_admin(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    owner: Annotated[str | None, Depends(get_owner)],
) -> str | None:
    """Operator routes: 401 without a valid key, 403 `admin_only` with a key that is not an admin key."""
    if not is_admin(request, settings):
        raise ApiError(403, "admin_only", "this route is for operators: it needs a key listed in SIDETUNE_ADMIN_KEYS")
    return owner


Owned = TypeVar("Owned", JobRecord, ModelRecord, DatasetRecord)


def owned(fetch: Callable[[str], Owned], kind: str, record_id: str, owner: str | None) -> Owned:
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
AdminDep = Annotated[str | None, Depends(require_admin)]
ServingDep = Annotated[Serving, Depends(get_serving)]


async def get_model_record(model_id: ModelId, store: StoreDep, owner: OwnerDep) -> ModelRecord:
    """The record of the model in the path, if the caller may use it (404 otherwise); Redis is read off the loop."""
    return await run_in_threadpool(owned, store.get_model, "model", model_id, owner)


ModelRecordDep = Annotated[ModelRecord, Depends(get_model_record)]
