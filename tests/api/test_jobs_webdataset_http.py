"""A job on WebDataset shards over real HTTP against the real processes: submitted by a brace pattern, each shard is
checked at submission (403 for one outside the allowed roots, 422 naming a missing one, 422 for a malformed
pattern), and the job extracts, trains and predicts as on the ImageFolder the shards were written from."""

from __future__ import annotations

import httpx

from services.data.datasets import read_imagefolder
from tests.shards import imagefolder_samples, write_shards

BACKBONE = {"name": "test_vit", "pretrained": False}


def body(path: str, **dataset) -> dict:
    return {
        "dataset": {"path": path, **dataset},
        "backbone": BACKBONE,
        "method": {"name": "linear"},
        "training": {"epochs": 2, "lr": 0.05},
    }


def test_a_job_on_shards_trains_and_each_shard_is_checked_at_submission(stack, tmp_path) -> None:
    running, client = stack
    data = running.settings.data_path / "datasets"
    folder = read_imagefolder(data / "digits" / "train")
    samples = imagefolder_samples(folder.paths, folder.classes, folder.labels.tolist())
    pattern = write_shards(data / "digit-shards", samples, per_shard=40)

    job = client.wait(client.submit(body(pattern))["id"], timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    model = httpx.get(f"{running.api_url}/models/{job['model_id']}").json()
    assert model["classes"] == folder.classes
    holdout = sorted((data / "digits" / "holdout").glob("*/*.png"))[:3]
    assert len(client.predict(job["model_id"], holdout)) == 3

    def refused(path: str) -> tuple[int, str, str]:
        r = httpx.post(f"{running.api_url}/jobs", json=body(path), timeout=30)
        error = r.json()["error"]
        return r.status_code, error["code"], error["message"]

    outside = write_shards(tmp_path / "elsewhere", samples[:4], per_shard=2)
    status, code, message = refused(outside)
    assert (status, code) == (403, "forbidden_path") and "000000.tar' is outside the allowed roots" in message
    status, code, message = refused(f"{data}/digit-shards/{{000000..000009}}.tar")  # more shards than there are
    assert status == 422 and "digit-shards/000004.tar' does not exist" in message
    status, code, message = refused(f"{data}/digit-shards/{{000000..000001.tar")
    assert status == 422 and "without its `}`" in message
