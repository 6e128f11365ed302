"""Datasets: upload an archive (zip or tar) holding an ImageFolder or a CSV manifest; list, read and delete them.

An upload streams to disk (at most `max_upload_mb`), is extracted safely into a staging folder, checked with the
readers the workers use (so a dataset that exists can be trained on) and published to the store
(`datasets/<id>/`, storage/datasets.py), from which a worker on any machine fetches its own copy.
A job names it as `dataset.id`; only the key that uploaded it can see, use or delete it. Deleting a dataset that
a queued or running job still needs is refused (409 `dataset_in_use`); once its jobs have ended it may go (their
models do not need it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.deps import DatasetId, OwnerDep, SettingsDep, StoreDep, owned
from api.errors import ApiError
from api.schemas import Dataset, DatasetList, ErrorBody
from api.uploads import receive_file
from services.data.datasets import DatasetError, read_dataset
from services.spec import JobSpec
from storage.datasets import (
    STAGING,
    ArchiveError,
    DatasetFiles,
    DatasetRecords,
    Limits,
    disk_usage,
    is_dataset_id,
    new_dataset_id,
    staging_dir,
    sweep_staging,
    unpack,
)
from storage.jobs import TERMINAL, JobStore, NotFound
from storage.settings import Settings
from storage.store import Incomplete

router = APIRouter(prefix="/datasets", tags=["datasets"], responses={401: {"model": ErrorBody}})

# ArchiveError codes -> HTTP status: too big is 413 like the upload limit; a bad archive or dataset is 422.
STATUS = {"invalid_archive": 422, "unsafe_archive": 422, "invalid_dataset": 422, "dataset_too_large": 413}

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "The archive as multipart field `file` (optional field `name`: a label), or as the raw body. "
        "Zip, tar, tar.gz/tgz (also bz2, xz); inside: one folder per class, optionally under one top-level "
        "folder, or a CSV manifest `path,label` at the top.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "The dataset archive."},
                        "name": {"type": "string", "description": "A label for the dataset."},
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def records(store: JobStore) -> DatasetRecords:
    return DatasetRecords(store.r)


def own_dataset(store: JobStore, dataset_id: str, owner: str | None) -> dict:
    return owned(records(store).get, "dataset", dataset_id, owner)


def _validate(path: Path, fmt: str) -> dict:
    """Runs on the staging folder before it is published: the dataset must read as the workers read it."""
    root = path.parent if path.is_file() else path
    try:
        dataset = read_dataset(path, fmt)
    except DatasetError as e:
        raise ArchiveError("invalid_dataset", str(e).replace(str(root), "<archive>")) from None
    return {"num_images": len(dataset), "classes": dataset.classes, "size_bytes": disk_usage(root)}


@router.post(
    "",
    status_code=201,
    response_model=Dataset,
    responses={413: {"model": ErrorBody}, 422: {"model": ErrorBody}},
    openapi_extra=_UPLOAD_BODY,
)
async def upload_dataset(request: Request, store: StoreDep, settings: SettingsDep, owner: OwnerDep) -> dict:
    """Upload a zip or tar archive of an ImageFolder or a CSV manifest. Refused with the cause: 413
    `upload_too_large` (over `max_upload_mb`) or `dataset_too_large` (extracted size or member count over the
    limits), 422 `invalid_archive` (not a readable zip/tar), `unsafe_archive` (absolute or `..` names, links,
    devices; the member is named) or `invalid_dataset` (e.g. fewer than 2 classes). Nothing is kept on failure."""
    files = DatasetFiles.from_settings(settings)
    dataset_id = new_dataset_id()
    await run_in_threadpool(sweep_staging, files.local_dir)
    with staging_dir(files.local_dir, f"upload-{dataset_id}") as tmp:
        archive = tmp / "archive"
        upload = await receive_file(request, archive, int(settings.max_upload_mb * 2**20))
        if upload.size == 0:
            raise ApiError(422, "invalid_archive", "the upload is empty: send a zip or tar archive")
        limits = Limits(max_bytes=int(settings.max_dataset_mb * 2**20), max_files=settings.max_dataset_files)
        try:
            rel, fmt, info = await run_in_threadpool(unpack, archive, files, dataset_id, limits, _validate)
        except ArchiveError as e:
            raise ApiError(STATUS[e.code], e.code, e.message) from None
    record = {
        "id": dataset_id,
        "object": "dataset",
        "owner": owner,
        "name": upload.name or upload.filename,
        "format": fmt,
        "path": str(files.local_dir / dataset_id / "files" / rel),  # where this machine reads it
        "num_images": info["num_images"],
        "classes": info["classes"],
        "size_bytes": info["size_bytes"],
    }
    try:
        return await run_in_threadpool(records(store).add, record)
    except Exception:
        await run_in_threadpool(files.remove, dataset_id)  # unrecorded files would never be deleted
        raise


@router.get("", response_model=DatasetList)
def list_datasets(
    store: StoreDep, owner: OwnerDep, limit: Annotated[int, Query(ge=1, le=1000, description="Most datasets.")] = 100
) -> dict:
    """The caller's datasets, newest first."""
    return {"object": "list", "data": records(store).list_datasets(limit=limit, owner=owner)}


@router.get("/{dataset_id}", response_model=Dataset, responses={404: {"model": ErrorBody}})
def get_dataset(dataset_id: DatasetId, store: StoreDep, owner: OwnerDep) -> dict:
    """One dataset: format, image count and classes."""
    return own_dataset(store, dataset_id, owner)


@router.delete(
    "/{dataset_id}", status_code=204, responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}}
)  # fmt: skip
def delete_dataset(dataset_id: DatasetId, store: StoreDep, settings: SettingsDep, owner: OwnerDep) -> Response:
    """Delete a dataset and its files. Refused (409 `dataset_in_use`) while a job using it is queued or running."""
    own_dataset(store, dataset_id, owner)
    busy = [job_id for job_id in records(store).job_ids(dataset_id) if _active(store, job_id)]
    if busy:
        raise ApiError(409, "dataset_in_use", f"dataset {dataset_id!r} is used by unfinished job(s) "
                       f"{', '.join(busy)}; cancel them or wait for them to end")  # fmt: skip
    # The record goes first: a job submitted from now on gets a 404, not a path that is about to vanish.
    records(store).delete(dataset_id)
    DatasetFiles.from_settings(settings).remove(dataset_id)
    return Response(status_code=204)


def _active(store: JobStore, job_id: str) -> bool:
    try:
        return store.get_job(job_id)["status"] not in TERMINAL
    except NotFound:
        return False


# ---- jobs that use a dataset (called by api/routes/jobs.py) ------------------------------------------------------
def _in_uploads(path: str, settings: Settings) -> bool:
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):  # a loop of links (RuntimeError): no dataset; the path check names the field
        return False
    if not resolved.is_relative_to(settings.datasets_dir):
        return False
    parts = resolved.relative_to(settings.datasets_dir).parts
    return bool(parts) and (is_dataset_id(parts[0]) or parts[0] == STAGING)


def resolve_dataset(spec: JobSpec, store: JobStore, owner: str | None, settings: Settings) -> JobSpec:
    """The spec with `dataset.id` resolved to the caller's uploaded dataset: its path on this machine (fetched
    from the store first if this machine has no copy) and its format are put in the spec, so the planner reads a
    path as for any dataset (each worker reads its own machine's copy). A plain path may not reach into uploaded
    datasets: they belong to one key, and only `dataset.id` checks whose."""
    ds = spec.dataset
    if ds.id is None:
        for field, path in (("dataset.path", ds.path), ("backbone.checkpoint", spec.backbone.checkpoint)):
            if path is not None and _in_uploads(path, settings):
                raise ApiError(403, "forbidden_path", f"{field}: {path!r} lies in an uploaded dataset; name an "
                               "uploaded dataset by `dataset.id`")  # fmt: skip
        return spec
    if ds.path is not None:
        raise ApiError(422, "invalid_request", "dataset: give `dataset.path` or `dataset.id`, not both")
    try:
        record = own_dataset(store, ds.id, owner)
    except ApiError:
        raise ApiError(404, "not_found", f"dataset.id: no dataset {ds.id!r}") from None
    if ds.format not in ("auto", record["format"]):
        raise ApiError(422, "invalid_request", f"dataset.format: dataset {ds.id!r} is {record['format']}, "
                       f"not {ds.format}")  # fmt: skip
    try:
        path, fmt = DatasetFiles.from_settings(settings).dataset_path(ds.id)
    except FileNotFoundError as e:  # recorded, yet not on the store: the store's fault, not the request's
        raise Incomplete(str(e)) from None
    resolved = ds.model_copy(update={"path": str(path), "format": fmt})
    return spec.model_copy(update={"dataset": resolved})


def record_use(store: JobStore, spec: JobSpec, job_id: str) -> None:
    """Remember that the job uses its uploaded dataset, so deleting the dataset can check the job's status."""
    if spec.dataset.id is not None:
        records(store).add_job(spec.dataset.id, job_id)
