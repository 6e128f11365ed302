"""Models: the adapted models that succeeded jobs registered."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from api.deps import OwnerDep, SettingsDep, StoreDep, owned
from api.errors import ApiError
from api.schemas import ErrorBody, Evaluation, Model, ModelList
from storage.artifacts import ArtifactStore
from storage.jobs import JobStore

router = APIRouter(prefix="/models", tags=["models"], responses={401: {"model": ErrorBody}})


def own_model(store: JobStore, model_id: str, owner: str | None) -> dict:
    return owned(store.get_model, "model", model_id, owner)


@router.get("", response_model=ModelList)
def list_models(
    store: StoreDep, owner: OwnerDep, limit: Annotated[int, Query(ge=1, le=1000, description="Most models.")] = 100
) -> dict:
    """Models, newest first."""
    return {"object": "list", "data": store.list_models(limit=limit, owner=owner)}


@router.get("/{model_id}", response_model=Model, responses={404: {"model": ErrorBody}})
def get_model(model_id: str, store: StoreDep, owner: OwnerDep) -> dict:
    """One model: method, backbone, classes and metrics."""
    return own_model(store, model_id, owner)


def _file(settings: SettingsDep, model_id: str, name: str, what: str) -> bytes:
    try:
        return ArtifactStore.from_settings(settings).read_file(model_id, name)
    except FileNotFoundError:
        raise ApiError(404, "not_found", f"model {model_id!r} has no {what}") from None


@router.get("/{model_id}/evaluation", response_model=Evaluation, responses={404: {"model": ErrorBody}})
def get_evaluation(model_id: str, store: StoreDep, owner: OwnerDep, settings: SettingsDep) -> Response:
    """The selected model's evaluation report (scikit-learn's metrics): on the test split when the job had one
    (`dataset.test_fraction` or `dataset.test`), else on the validation split (`split` says which)."""
    own_model(store, model_id, owner)
    return Response(_file(settings, model_id, "evaluation.json", "evaluation report"), media_type="application/json")


@router.get(
    "/{model_id}/plots/{name}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The PNG."}, 404: {"model": ErrorBody}},
)
def get_plot(
    model_id: str,
    name: Annotated[str, Path(pattern=r"^[a-z0-9_]+$", description="`curves` or `confusion` (see the model's plots).")],
    store: StoreDep,
    owner: OwnerDep,
    settings: SettingsDep,
) -> Response:
    """A plot of the model: `curves` (training loss, validation figure and learning rate per epoch, one line per
    sweep configuration; the L2 path of an L-BFGS linear probe) or `confusion` (the evaluation's confusion matrix)."""
    own_model(store, model_id, owner)
    return Response(_file(settings, model_id, f"plots/{name}.png", f"plot {name!r}"), media_type="image/png")
