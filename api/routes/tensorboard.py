"""A job's TensorBoard event files (services/training/tensorboard.py writes them as the job trains) as one
gzipped tar: `GET /jobs/{id}/tensorboard`, for the job's owner. Extracted into a folder, `tensorboard --logdir` on it
shows one run per configuration. Reads the store only (no torch, no TensorBoard here).
"""

from __future__ import annotations

import io
import tarfile
import time

from fastapi import APIRouter, Response

from api.deps import JobId, OwnerDep, SettingsDep, StoreDep
from api.errors import ApiError
from api.routes.jobs import own_job
from api.schemas import ErrorBody
from storage.artifacts import ArtifactStore

router = APIRouter(prefix="/jobs", tags=["jobs"], responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody}})


@router.get(
    "/{job_id}/tensorboard",
    response_class=Response,
    responses={
        200: {"content": {"application/gzip": {}}, "description": "The event files, a tar.gz of the runs' folders."},
        404: {"model": ErrorBody},
    },
)
def job_tensorboard(job_id: JobId, store: StoreDep, settings: SettingsDep, owner: OwnerDep) -> Response:
    """The job's TensorBoard event files as a tar.gz: a run per configuration (the root for a job of one), with
    scalars per epoch, the hyperparameters and the plots; while the job trains, its epochs so far."""
    own_job(store, job_id, owner)
    folder = ArtifactStore.from_settings(settings).tensorboard(job_id)
    files = folder.files()
    if not files:
        raise ApiError(
            404, "not_found", f"job {job_id!r} has no TensorBoard events (it has not trained an epoch, or was deleted)"
        )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in sorted(files):
            data = folder.read_bytes(name)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), int(folder.modified(name) or time.time())
            tar.addfile(info, io.BytesIO(data))
    return Response(
        buf.getvalue(),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-tensorboard.tar.gz"'},
    )
