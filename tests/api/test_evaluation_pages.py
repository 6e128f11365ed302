"""`GET /models/{id}/evaluation` in pages over real HTTP (the API under uvicorn, real Redis, the store on disk): a
250-class report served 100 classes at a time with its sparse confusion cut to the page, a 10-class report whole as
before, and bad page parameters refused."""

from __future__ import annotations

import httpx
import numpy as np

from api.main import create_app
from services.training import evaluation, reports
from storage.artifacts import ArtifactStore
from storage.redis import JobStore, now
from tests.helpers import serve


def save(settings, model_id: str, classes: int, images: int) -> dict:
    rng = np.random.default_rng(classes)
    targets = rng.integers(0, classes, images)
    pred = np.where(rng.random(images) < 0.6, targets, rng.integers(0, classes, images))
    report = evaluation.label_report(targets, pred, None, [f"class {i}" for i in range(classes)], "test")
    ArtifactStore.from_settings(settings).save_model(
        model_id, {"w": np.zeros(1, np.float32)}, {}, {}, {"evaluation.json": reports.encode(report)}
    )
    JobStore.from_url(settings.redis_url).register_model(
        {
            "id": model_id,
            "object": "model",
            "created_at": now(),
            "job_id": f"job_{model_id}",
            "owner": None,
            "method": "linear",
            "backbone": "test_vit",
            "classes": report["classes"],
            "metrics": {},
        }
    )
    return report


def test_a_large_report_comes_in_pages_and_a_small_one_whole(settings) -> None:
    large = save(settings, "model_pages_250", 250, 1000)
    small = save(settings, "model_pages_10", 10, 80)
    with serve(create_app(settings)) as url:
        get = lambda path, **params: httpx.get(f"{url}{path}", params=params, timeout=30)  # noqa: E731

        first = get("/models/model_pages_250/evaluation").json()
        assert (first["offset"], first["limit"], first["total"], first["has_more"]) == (0, 100, 250, True)
        assert first["classes"] == large["classes"][:100] and first["per_class"] == large["per_class"][:100]
        assert "confusion_matrix" not in first and max(first["confusion"]["true"]) < 100
        assert first["metrics"] == large["metrics"] and first["top_confusions"] == large["top_confusions"]
        pages = [first]
        while pages[-1]["has_more"]:
            pages.append(get("/models/model_pages_250/evaluation", offset=pages[-1]["offset"] + 100).json())
        assert len(pages) == 3 and len(pages[-1]["per_class"]) == 50
        assert [c for p in pages for c in p["confusion"]["count"]] == large["confusion"]["count"]
        assert len(get("/models/model_pages_250/evaluation", offset=10, limit=5).json()["per_class"]) == 5

        whole = get("/models/model_pages_10/evaluation").json()
        assert not whole["has_more"] and whole["total"] == 10
        assert {k: whole[k] for k in small} == small  # everything the stored report holds, as it holds it

        for params in ({"limit": reports.MAX_PAGE + 1}, {"limit": 0}, {"offset": -1}):
            r = get("/models/model_pages_250/evaluation", **params)
            assert r.status_code == 422, params
        assert get("/models/model_unknown/evaluation").status_code == 404
