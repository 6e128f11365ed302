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
    ArchiveError,
    DatasetFiles,
    disk_usage,
    new_dataset_id,
    staging_dir,
    sweep_staging,
    unpack,
)
from storage.faults import Incomplete, free_bytes, naming_disk_full
from storage.quotas import UPLOADS
from storage.redis import TERMINAL, DatasetRecord, JobStore, NotFound
from storage.settings import Settings

router = APIRouter(prefix="/datasets", tags=["datasets"], responses={401: {"model": ErrorBody}})

# ArchiveError codes -> HTTP status: too big is 413 like the upload limit; a bad archive or dataset is 422.
STATUS = {"invalid_archive": 422, "unsafe_archive": 422, "invalid_dataset": 422, "dataset_too_large": 413}
UPLOADS_SETTING = "SIDETUNE_KEY_QUOTA_UPLOADS_GB"

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


def own_dataset(store: JobStore, dataset_id: str, owner: str | None) -> DatasetRecord:
    return owned(store.datasets.get, "dataset", dataset_id, owner)


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
    responses={
        409: {"model": ErrorBody},
        413: {"model": ErrorBody},
        422: {"model": ErrorBody},
        507: {"model": ErrorBody},
    },
    openapi_extra=_UPLOAD_BODY,
)
async def upload_dataset(request: Request, store: StoreDep, settings: SettingsDep, owner: OwnerDep) -> dict:
    """Upload a zip or tar archive of an ImageFolder or a CSV manifest. Refused with the cause: 413
    `upload_too_large` (over `max_upload_mb`) or `dataset_too_large` (extracted size or member count over the
    limits), 422 `invalid_archive` (not a readable zip/tar), `unsafe_archive` (absolute or `..` names, links,
    devices; the member is named) or `invalid_dataset` (e.g. fewer than 2 classes); 409 `quota_exceeded` (the key's
    uploaded datasets would pass SIDETUNE_KEY_QUOTA_UPLOADS_GB) or `upload_does_not_fit` (an upload larger than the
    free disk), 507 `disk_full` when the disk fills up meanwhile. Nothing is kept on failure."""
    files = DatasetFiles.from_settings(settings)
    dataset_id = new_dataset_id()
    usage, quota = store.usage, settings.key_quota_uploads_gb
    usage.check(owner, UPLOADS, quota, UPLOADS_SETTING)  # a key at its quota is refused before the upload is read
    reserved = 0

    def validate(path: Path, fmt: str) -> dict:
        nonlocal reserved
        info = _validate(path, fmt)
        # before publishing, atomically: concurrent uploads of one key never pass its quota together
        usage.reserve(owner, UPLOADS, info["size_bytes"], quota, UPLOADS_SETTING)
        reserved = info["size_bytes"]
        return info

    await run_in_threadpool(sweep_staging, files.local_dir)
    length = request.headers.get("content-length", "")
    free = free_bytes(files.local_dir)
    if length.isdigit() and free is not None and int(length) > free:  # the request itself cannot fit: not the server's
        raise ApiError(
            409,
            "upload_does_not_fit",
            f"the upload ({int(length) / 1e6:.2f} MB) is larger than the free "
            f"space where datasets are staged ({free / 1e6:.2f} MB); upload a smaller archive, or ask the "
            "operator to free space",
        )
    try:
        with (
            naming_disk_full(files.local_dir, "an uploaded dataset", int(length) if length.isdigit() else None),
            staging_dir(files.local_dir, f"upload-{dataset_id}") as tmp,
        ):
            archive = tmp / "archive"
            upload = await receive_file(request, archive, int(settings.max_upload_mb * 2**20))
            if upload.size == 0:
                raise ApiError(422, "invalid_archive", "the upload is empty: send a zip or tar archive")
            try:
                rel, fmt, info = await run_in_threadpool(
                    unpack, archive, files, dataset_id, settings.archive_limits, validate
                )
            except ArchiveError as e:
                raise ApiError(STATUS[e.code], e.code, e.message) from None
        record: DatasetRecord = {
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
            return await run_in_threadpool(store.datasets.add, record)
        except Exception:
            await run_in_threadpool(files.remove, dataset_id)  # unrecorded files would never be deleted
            raise
    except BaseException:
        if reserved:  # not kept: its bytes no longer count against the key
            usage.add(owner, UPLOADS, -reserved)
        raise


@router.get("", response_model=DatasetList)
def list_datasets(
    store: StoreDep, owner: OwnerDep, limit: Annotated[int, Query(ge=1, le=1000, description="Most datasets.")] = 100
) -> dict:
    """The caller's datasets, newest first."""
    return {"object": "list", "data": store.datasets.list_datasets(limit=limit, owner=owner)}


@router.get("/{dataset_id}", response_model=Dataset, responses={404: {"model": ErrorBody}})
def get_dataset(dataset_id: DatasetId, store: StoreDep, owner: OwnerDep) -> DatasetRecord:
    """One dataset: format, image count and classes."""
    return own_dataset(store, dataset_id, owner)


@router.delete("/{dataset_id}", status_code=204, responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}})
def delete_dataset(dataset_id: DatasetId, store: StoreDep, settings: SettingsDep, owner: OwnerDep) -> Response:
    """Delete a dataset and its files. Refused (409 `dataset_in_use`) while a job using it is queued or running."""
    record = own_dataset(store, dataset_id, owner)
    busy = [job_id for job_id in store.datasets.job_ids(dataset_id) if _active(store, job_id)]
    if busy:
        raise ApiError(
            409,
            "dataset_in_use",
            f"dataset {dataset_id!r} is used by unfinished job(s) "
            f"{', '.join(busy)}; cancel them or wait for them to end",
        )
    # The record goes first: a job submitted from now on gets a 404, not a path that is about to vanish.
    if store.datasets.delete(dataset_id):  # the one caller that removed it gives its bytes back to the key's quota
        store.usage.add(owner, UPLOADS, -int(record.get("size_bytes") or 0))
    DatasetFiles.from_settings(settings).remove(dataset_id)
    return Response(status_code=204)


def _active(store: JobStore, job_id: str) -> bool:
    try:
        return store.get_job(job_id)["status"] not in TERMINAL
    except NotFound:
        return False


# ---- jobs that use a dataset (called by api/routes/jobs.py) ------------------------------------------------------
def _upload_path(
    dataset_id: str, field: str, store: JobStore, owner: str | None, settings: Settings
) -> tuple[str, str]:
    """Where this machine reads the caller's uploaded dataset `dataset_id` (fetched from the store first if it has
    no copy), and its format; 404 naming `field` for another key's dataset or none."""
    try:
        own_dataset(store, dataset_id, owner)
    except ApiError:
        raise ApiError(404, "not_found", f"{field}: no dataset {dataset_id!r}") from None
    try:
        path, fmt = DatasetFiles.from_settings(settings).dataset_path(dataset_id)
    except FileNotFoundError as e:  # recorded, yet not on the store: the store's fault, not the request's
        raise Incomplete(str(e)) from None
    return str(path), fmt


def resolve_dataset(spec: JobSpec, store: JobStore, owner: str | None, settings: Settings) -> JobSpec:
    """The spec with `dataset.id` (and `dataset.test_id`) resolved to the caller's uploaded datasets: their paths on
    this machine and the format are put in the spec, so the planner reads a path as for any dataset (each worker reads
    its own machine's copy). An upload is readable through its id only (services/paths.py refuses its path)."""
    ds = spec.dataset
    update: dict = {}
    if ds.id is not None:
        if ds.path is not None:
            raise ApiError(422, "invalid_request", "dataset: give `dataset.path` or `dataset.id`, not both")
        path, fmt = _upload_path(ds.id, "dataset.id", store, owner, settings)
        if ds.format not in ("auto", fmt):
            raise ApiError(422, "invalid_request", f"dataset.format: dataset {ds.id!r} is {fmt}, not {ds.format}")
        update.update(path=path, format=fmt)
    if ds.test_id is not None:
        if ds.test is not None:
            raise ApiError(422, "invalid_request", "dataset: give `dataset.test` or `dataset.test_id`, not both")
        update["test"] = _upload_path(ds.test_id, "dataset.test_id", store, owner, settings)[0]
    return spec.model_copy(update={"dataset": ds.model_copy(update=update)}) if update else spec


def record_use(store: JobStore, spec: JobSpec, job_id: str) -> None:
    """Remember that the job uses its uploaded datasets, so deleting one can check the job's status."""
    for dataset_id in {spec.dataset.id, spec.dataset.test_id} - {None}:
        store.datasets.add_job(dataset_id, job_id)
