"""Jobs: submit, read, list, cancel, delete, follow their events, and list and download their checkpoints."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.responses import JSONResponse

from api.deps import CeleryDep, JobId, OwnerDep, SettingsDep, StoreDep, owned
from api.errors import ApiError
from api.routes.datasets import record_use, resolve_dataset
from api.schemas import CheckpointList, ErrorBody, EventList, Job, JobList, Plan
from services.data.datasets import resolve_format
from services.jobs import quotas
from services.jobs.planning import check_spec, plan_checked
from services.jobs.retention import expires_at
from services.paths import ForbiddenPath, UserPaths
from services.spec import JobSpec
from storage.artifacts import ArtifactStore
from storage.logs import log_context
from storage.quotas import TooManyJobs
from storage.redis import Busy, IdempotencyConflict, JobRecord, JobStore, NotFound
from storage.settings import Settings
from worker.celery_app import enqueue_plan

log = logging.getLogger("sidetune.api")

router = APIRouter(prefix="/jobs", tags=["jobs"], responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody}})


def own_job(store: JobStore, job_id: str, owner: str | None) -> JobRecord:
    return owned(store.get_job, "job", job_id, owner)


def _check_paths(spec: JobSpec, settings: Settings) -> None:
    """Refuse at submission what would certainly fail later: every path field the spec names (services/paths.py:
    403 for the service's own folders, or outside the allowed roots, or an object URL outside the allowed prefixes;
    422 if missing), and a dataset of the wrong kind. The plan step then reads the datasets under the same rule."""
    paths = UserPaths(settings)
    ds = spec.dataset
    for field, path, upload in spec.server_paths():
        try:
            resolved = paths.check_location(field, path, upload)
        except ForbiddenPath as e:
            raise ApiError(403, "forbidden_path", str(e)) from None
        except FileNotFoundError as e:
            raise ApiError(422, "not_found", str(e)) from None
        except (OSError, RuntimeError) as e:  # a name too long for the filesystem, a loop of links (RuntimeError)
            why = e.strerror if isinstance(e, OSError) else str(e)
            raise ApiError(422, "invalid_request", f"{field}: {path[:200]!r} cannot be read: {why}") from None
        if field in ("dataset.path", "dataset.test") and not isinstance(resolved, str):  # objects: read when planned
            fmt = resolve_format(resolved, ds.format if field == "dataset.path" else "auto")
            if fmt == "imagefolder" and not resolved.is_dir():
                raise ApiError(422, "invalid_dataset", f"{field}: {path!r} is not a directory (ImageFolder layout)")
            if fmt == "csv" and not resolved.is_file():
                raise ApiError(422, "invalid_dataset", f"{field}: {path!r} is not a CSV file")


@router.post(
    "",
    status_code=201,
    response_model=Job,
    responses={
        200: {"model": Plan, "description": "`dry_run=true`: the job's plan; no job is created."},
        403: {"model": ErrorBody},
        409: {"model": ErrorBody},
        429: {"model": ErrorBody, "description": "The key has SIDETUNE_KEY_QUOTA_JOBS jobs queued or running."},
        503: {"model": ErrorBody},
    },
)
def create_job(
    spec: JobSpec,
    store: StoreDep,
    celery: CeleryDep,
    settings: SettingsDep,
    owner: OwnerDep,
    response: Response,
    dry_run: Annotated[
        bool, Query(description="Return the plan (cache size, quota and memory fit, extraction time); create no job.")
    ] = False,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            description="Retry-safe submission: a retry with the same key and spec within 24 h returns the job the "
            "first request created (header `Idempotent-Replayed: true`) instead of a new one.",
        ),
    ] = None,
) -> dict | JSONResponse:
    """Validate the spec and its paths, record the job (`planning`) and enqueue plan -> extract -> train; answers at
    once whatever the dataset's size. The plan step reads the dataset in a worker: a job it refuses fails with the
    code and message a dry run answers with (`cache_over_quota`, `does_not_fit_memory`, `invalid_dataset`, ...), shown
    in `GET /jobs/{id}` and its events. `dry_run=true` plans in the request and returns the plan (422 for those
    refusals). Per-key quotas: 429 `too_many_jobs` (with Retry-After) when the key has SIDETUNE_KEY_QUOTA_JOBS jobs
    queued or running, 409 `quota_exceeded` when its models passed their quota (the job fails `quota_exceeded` when
    its feature cache entry would pass the key's cache quota)."""
    limit = settings.key_quota_jobs  # the key's jobs queued or running: checked as the job is recorded (429)
    if not dry_run and idempotency_key is None and (active := store.active_jobs(owner)) >= limit:
        raise TooManyJobs(active, limit)  # at once: a flood of submissions is not planned one by one
    spec = resolve_dataset(spec, store, owner, settings)  # `dataset.id` -> the caller's uploaded dataset's path
    _check_paths(spec, settings)
    if dry_run:  # see before you submit: planned here, reading the whole dataset
        return JSONResponse(plan_checked(spec, settings)[0].model_dump(mode="json"))
    check_spec(spec, settings)  # what the planner refuses without reading the dataset (422, as a dry run answers)
    quotas.check_models(store, settings, owner)  # the key's models (409); its cache quota needs the plan's size
    if idempotency_key is None:
        job = store.create_job(spec.model_dump(mode="json"), owner=owner, limit=limit, status="planning")
    else:
        try:
            job, created = store.create_job_once(
                idempotency_key, spec.model_dump(mode="json"), owner=owner, limit=limit, status="planning"
            )
        except IdempotencyConflict:
            raise ApiError(
                409,
                "idempotency_key_reused",
                "this Idempotency-Key was used with another job spec; use a new key for a new job",
            ) from None
        except NotFound:
            raise ApiError(
                409,
                "idempotency_in_progress",
                "a request with this Idempotency-Key is still being processed; retry shortly",
            ) from None
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
            return job
    record_use(store, spec, job["id"])  # before it runs: deleting its dataset is refused from now on
    store.add_event(job["id"], "job queued")  # for its plan step, which records the plan
    try:
        enqueue_plan(celery, job["id"], store.queue_position(job["id"]))
    except Exception as e:
        store.set_fields(job["id"], status="failed", error={"code": "queue_unavailable", "message": str(e)})
        raise ApiError(503, "queue_unavailable", f"could not enqueue the job: {e}") from None
    with log_context(job_id=job["id"]):
        log.info("job queued for planning: %s on %s", spec.method.name, spec.backbone.name)
    return job


@router.get("", response_model=JobList)
def list_jobs(
    store: StoreDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    after: Annotated[str | None, Query(description="Id of the last job of the previous page.")] = None,
) -> dict:
    """Jobs, newest first, paginated by cursor."""
    if after is not None:
        own_job(store, after, owner)
    try:
        jobs = store.list_jobs(limit=limit + 1, after=after, owner=owner)
    except NotFound:
        raise ApiError(404, "not_found", f"no job {after!r}") from None
    return {"object": "list", "data": jobs[:limit], "has_more": len(jobs) > limit}


@router.get("/{job_id}", response_model=Job, responses={404: {"model": ErrorBody}})
def get_job(job_id: JobId, store: StoreDep, owner: OwnerDep) -> JobRecord:
    """One job with its status, progress, metrics and error."""
    return own_job(store, job_id, owner)


@router.post("/{job_id}/cancel", response_model=Job, responses={404: {"model": ErrorBody}})
def cancel_job(job_id: JobId, store: StoreDep, owner: OwnerDep) -> JobRecord:
    """Queued jobs are cancelled at once; running ones stop at their next check (between batches)."""
    own_job(store, job_id, owner)
    return store.request_cancel(job_id)


@router.delete("/{job_id}", status_code=204, responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}})
def delete_job(job_id: JobId, store: StoreDep, settings: SettingsDep, owner: OwnerDep) -> Response:
    """Delete a finished job: its record, events and checkpoint. Refused while it is queued or running (409
    `job_not_finished`: cancel it first). Its model, if any, stays (`DELETE /models/{id}` deletes it)."""
    own_job(store, job_id, owner)
    try:
        store.delete_job(job_id)
    except Busy as e:
        raise ApiError(
            409,
            "job_not_finished",
            f"job {job_id!r} is {e}; cancel it first (POST /jobs/{job_id}/cancel) or wait for it to end",
        ) from None
    except NotFound:  # deleted meanwhile
        raise ApiError(404, "not_found", f"no job {job_id!r}") from None
    artifacts = ArtifactStore.from_settings(settings)
    artifacts.drop_checkpoints(job_id)
    artifacts.job(job_id).remove()
    return Response(status_code=204)


@router.get("/{job_id}/events", response_model=EventList, responses={404: {"model": ErrorBody}})
def job_events(
    job_id: JobId,
    store: StoreDep,
    owner: OwnerDep,
    after: Annotated[int, Query(ge=0, le=2**53, description="Return events with `seq` greater than this.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most events returned.")] = 100,
) -> dict:
    """Progress messages and per-epoch metrics, oldest first; `has_more` says whether a next page follows."""
    own_job(store, job_id, owner)
    events = store.events(job_id, after=after, limit=limit + 1)
    return {"object": "list", "data": events[:limit], "has_more": len(events) > limit}


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, responses={404: {"model": ErrorBody}})
def job_checkpoints(job_id: JobId, store: StoreDep, settings: SettingsDep, owner: OwnerDep) -> dict:
    """The job's checkpoint on the store: written after every epoch (a train worker that dies resumes from it), kept
    for SIDETUNE_CHECKPOINT_RETENTION_H after the job ends (`expires_at`), then removed."""
    job = own_job(store, job_id, owner)
    folder = ArtifactStore.from_settings(settings).checkpoints(job_id)
    files = folder.files()
    info = folder.read_json("checkpoint.json") if "checkpoint.json" in files else {}
    data = [
        {
            "name": name,
            "size_bytes": size,
            "created_at": folder.modified(name),
            "epoch": info.get("epoch"),
            "best_epoch": info.get("best_epoch"),
        }
        for name, size in sorted(files.items())
    ]
    return {"object": "list", "data": data, "expires_at": expires_at(job, settings)}


@router.get(
    "/{job_id}/checkpoints/{name}",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The file."},
        404: {"model": ErrorBody},
    },
)
def job_checkpoint_file(
    job_id: JobId,
    name: Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]+$", description="A file the listing names.")],
    store: StoreDep,
    settings: SettingsDep,
    owner: OwnerDep,
) -> Response:
    """Download a checkpoint file (safetensors or JSON, as written)."""
    own_job(store, job_id, owner)
    folder = ArtifactStore.from_settings(settings).checkpoints(job_id)
    if name.startswith(".") or name not in folder.files():
        raise ApiError(
            404,
            "not_found",
            f"job {job_id!r} has no checkpoint file {name!r} (removed after the retention, or never written)",
        )
    media = "application/json" if name.endswith(".json") else "application/octet-stream"
    return Response(
        folder.read_bytes(name),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{job_id}-{name}"'},
    )
