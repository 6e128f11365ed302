"""Models: the adapted models that succeeded jobs registered."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import OwnerDep, StoreDep, owned
from api.schemas import ErrorBody, Model, ModelList
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
