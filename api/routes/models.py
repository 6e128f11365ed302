"""Models: the adapted models that succeeded jobs registered; list, read and delete them. The inference service
serves the reading routes too (`read_only`); exporting a model is its route (api/routes/export.py)."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import JSONResponse

from api.deps import ModelId, OwnerDep, SettingsDep, StoreDep, owned
from api.errors import ApiError
from api.schemas import ErrorBody, Evaluation, Model, ModelList
from services.training import reports
from storage.artifacts import ArtifactStore
from storage.redis import JobStore, ModelRecord, NotFound, job_id_for, now

router = APIRouter(prefix="/models", tags=["models"], responses={401: {"model": ErrorBody}})


def own_model(store: JobStore, model_id: str, owner: str | None) -> ModelRecord:
    return owned(store.get_model, "model", model_id, owner)


def own_model_or_why(store: JobStore, model_id: str, owner: str | None) -> ModelRecord:
    """The caller's model; for the id of a model that its job has not registered, 409 naming why: the job failed,
    was cancelled, or has not finished (a model's id is its job's: `model_X` comes from `job_X`)."""
    try:
        return own_model(store, model_id, owner)
    except ApiError:
        try:
            job = owned(store.get_job, "job", job_id_for(model_id), owner) if model_id.startswith("model_") else None
        except ApiError:
            job = None
        if job is None or job["status"] == "succeeded":
            raise
        status, error = job["status"], job.get("error") or {}
        if status == "failed":
            raise ApiError(
                409,
                "job_failed",
                f"model {model_id!r} does not exist: its job {job['id']} failed "
                f"({error.get('code')}: {error.get('message')})",
            ) from None
        if status == "cancelled":
            raise ApiError(
                409, "job_cancelled", f"model {model_id!r} does not exist: its job {job['id']} was cancelled"
            ) from None
        raise ApiError(
            409,
            "model_not_ready",
            f"model {model_id!r} does not exist yet: its job {job['id']} is "
            f"{status}; the model is registered when the job succeeds",
        ) from None


@router.get("", response_model=ModelList)
def list_models(
    store: StoreDep, owner: OwnerDep, limit: Annotated[int, Query(ge=1, le=1000, description="Most models.")] = 100
) -> dict:
    """Models, newest first."""
    return {"object": "list", "data": store.list_models(limit=limit, owner=owner)}


@router.get("/{model_id}", response_model=Model, responses={404: {"model": ErrorBody}})
def get_model(model_id: ModelId, store: StoreDep, owner: OwnerDep) -> ModelRecord:
    """One model: method, backbone, classes and metrics."""
    return own_model(store, model_id, owner)


@router.delete("/{model_id}", status_code=204, responses={404: {"model": ErrorBody}})
def delete_model(model_id: ModelId, store: StoreDep, settings: SettingsDep, owner: OwnerDep) -> Response:
    """Delete a model: its record, then its files on the store. Predict and export answer 404 from then on; its job
    stays (its `model_id` cleared, an event says so)."""
    record = own_model(store, model_id, owner)
    store.delete_model(model_id)  # first: from now on nobody is handed files that are about to vanish
    ArtifactStore.from_settings(settings).delete_model(model_id)
    try:
        store.update_job(record["job_id"], lambda job: job.update(model_id=None, model_deleted_at=now()))
        store.add_event(record["job_id"], f"model {model_id} deleted")
    except NotFound:  # the job was deleted before its model
        pass
    return Response(status_code=204)


def _file(settings: SettingsDep, model_id: str, name: str, what: str) -> bytes:
    try:
        return ArtifactStore.from_settings(settings).read_file(model_id, name)
    except FileNotFoundError:
        raise ApiError(404, "not_found", f"model {model_id!r} has no {what}") from None


@router.get("/{model_id}/evaluation", response_model=Evaluation, responses={404: {"model": ErrorBody}})
def get_evaluation(
    model_id: ModelId,
    store: StoreDep,
    owner: OwnerDep,
    settings: SettingsDep,
    offset: Annotated[int, Query(ge=0, description="The first class (row) of the page.")] = 0,
    limit: Annotated[
        int, Query(ge=1, le=reports.MAX_PAGE, description=f"Classes (rows) on the page; at most {reports.MAX_PAGE}.")
    ] = reports.PAGE,
) -> Response:
    """The selected model's evaluation report (scikit-learn's metrics): on the test split when the job had one
    (`dataset.test_fraction` or `dataset.test`), else on the validation split (`split` says which). Per-class rows
    come in pages of `limit` classes from `offset` (`has_more` says whether more follow; a model of at most 100
    classes fits the default page whole); the summary figures and `top_confusions` come with every page."""
    own_model(store, model_id, owner)
    report = json.loads(_file(settings, model_id, "evaluation.json", "evaluation report"))
    return JSONResponse(reports.page(report, offset, limit))


@router.get(
    "/{model_id}/plots/{name}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The PNG."}, 404: {"model": ErrorBody}},
)
def get_plot(
    model_id: ModelId,
    name: Annotated[
        str,
        Path(pattern=r"^[a-z0-9_]+$", max_length=64, description="`curves` or `confusion` (see the model's plots)."),
    ],
    store: StoreDep,
    owner: OwnerDep,
    settings: SettingsDep,
) -> Response:
    """A plot of the model: `curves` (training loss, validation figure and learning rate per epoch, one line per
    sweep configuration; the L2 path of an L-BFGS linear probe) or `confusion` (the evaluation's confusion matrix)."""
    own_model(store, model_id, owner)
    return Response(_file(settings, model_id, f"plots/{name}.png", f"plot {name!r}"), media_type="image/png")


# The inference service serves model metadata read-only: the GET routes of this router.
read_only = APIRouter(routes=[r for r in router.routes if getattr(r, "methods", None) == {"GET"}])
