"""`GET /catalog` (api/routes/catalog.py): what a job may name, for the page's new-job form. Every method the spec
takes (`auto` first, the default), every backbone name the spec accepts, and the same key rule as every route."""

from __future__ import annotations

from fastapi.testclient import TestClient

from services.methods import METHOD_NAMES
from services.spec import JobSpec


def test_the_catalog_lists_the_methods_and_backbones_a_job_may_name(settings) -> None:
    from api.main import create_app

    with TestClient(create_app(settings)) as http:
        catalog = http.get("/catalog").json()
    names = [m["name"] for m in catalog["methods"]]
    assert names == ["auto", *METHOD_NAMES] and catalog["default_method"] == "auto"
    assert all(m["description"] and m["modes"] and m["kind"] in ("side", "adapted") for m in catalog["methods"])
    assert {"test_vit", "vit_base_patch16_224", catalog["default_backbone"]} <= set(catalog["backbones"])
    for method in names:  # each as the spec takes it, with the first and the default backbone
        for backbone in (catalog["backbones"][0], catalog["default_backbone"]):
            JobSpec.model_validate(
                {"dataset": {"path": "/data/x"}, "backbone": {"name": backbone}, "method": {"name": method}}
            )


def test_the_catalog_needs_a_key_where_the_api_has_keys(settings) -> None:
    from api.main import create_app

    with TestClient(create_app(settings.model_copy(update={"api_keys": ["key-a"]}))) as http:
        refused = http.get("/catalog")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        assert http.get("/catalog", headers={"Authorization": "Bearer key-a"}).status_code == 200
