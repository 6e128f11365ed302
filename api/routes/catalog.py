"""What a job may name: the methods and the backbones the API accepts, for a form to offer (the page's new-job form)
without repeating the lists. Read-only; the same key rule as every route."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.deps import get_owner
from api.schemas import Catalog, ErrorBody, MethodInfo
from services.architectures import supported_names
from services.methods import CONFIGS, METHOD_NAMES
from services.methods.auto import AutoConfig

router = APIRouter(tags=["jobs"], dependencies=[Depends(get_owner)], responses={401: {"model": ErrorBody}})

DEFAULT_BACKBONE = "vit_base_patch16_224"


def _method(config: type) -> MethodInfo:
    name = config.model_fields["name"].default
    line = (config.model_fields["name"].description or "").removeprefix("Method name: ")
    return MethodInfo(name=name, kind=config.kind, modes=list(config.modes), description=line[:1].upper() + line[1:])


@router.get("/catalog", response_model=Catalog)
def catalog() -> Catalog:
    """The methods (`auto` first: the choice for a user who does not know them) with their kind, modes and a line on
    each, and every backbone name `POST /jobs` accepts."""
    return Catalog(
        methods=[_method(AutoConfig), *(_method(CONFIGS[name]) for name in METHOD_NAMES)],
        default_method=AutoConfig.model_fields["name"].default,
        backbones=sorted(supported_names()),
        default_backbone=DEFAULT_BACKBONE,
    )
