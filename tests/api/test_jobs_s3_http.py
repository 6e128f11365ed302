"""A job on WebDataset shards in an object store (a real moto S3 server) over real HTTP against the real processes,
started with SIDETUNE_ALLOWED_PREFIXES: the job extracts (its loaders reading the shards from the store), trains and
predicts as on the ImageFolder the shards were written from. A URL outside the prefixes (shards, or a Hugging Face
dataset's Parquet files) is refused at submission (403, as a path outside the allowed roots), and a URL carrying
credentials is refused without the secret appearing in the answer."""

from __future__ import annotations

import fsspec
import httpx
import pytest

from services.data.datasets import read_imagefolder
from services.data.digits import write_digits
from storage.settings import Settings
from tests.shards import imagefolder_samples, write_shards
from worker.client import Client
from worker.launcher import Stack, free_port

SECRET = "sEcReT-never-shown-4242424242"


def body(path: str) -> dict:
    return {
        "dataset": {"path": path},
        "backbone": {"name": "test_vit", "pretrained": False},
        "method": {"name": "linear"},
        "training": {"epochs": 2, "lr": 0.05},
    }


@pytest.fixture
def s3_stack(tmp_path_factory: pytest.TempPathFactory, s3_url: str):
    data = tmp_path_factory.mktemp("s3-stack")
    settings = Settings(
        data_dir=data,
        embedded_redis_port=free_port(),
        api_port=free_port(),
        inference_port=free_port(),
        device="cpu",
        allowed_prefixes=[f"{s3_url}/datasets/"],
    )
    write_digits(data / "datasets" / "digits", limit=150)
    with Stack(settings) as running:
        yield running, Client(running.api_url), s3_url


def test_a_job_on_s3_shards_trains_and_urls_outside_the_prefixes_are_refused(s3_stack, tmp_path) -> None:
    running, client, s3_url = s3_stack
    data = running.settings.data_path / "datasets"
    folder = read_imagefolder(data / "digits" / "train")
    samples = imagefolder_samples(folder.paths, folder.classes, folder.labels.tolist())
    write_shards(tmp_path / "shards", samples, per_shard=40)
    fs, path = fsspec.core.url_to_fs(f"{s3_url}/datasets/digits")
    fs.put(str(tmp_path / "shards"), path, recursive=True)
    count = len(list((tmp_path / "shards").glob("*.tar")))
    pattern = f"{s3_url}/datasets/digits/{{000000..{count - 1:06d}}}.tar"

    def refused(path: str) -> tuple[int, str, str]:
        r = httpx.post(f"{running.api_url}/jobs", json=body(path), timeout=30)
        error = r.json()["error"]
        return r.status_code, error["code"], error["message"]

    status, code, message = refused(f"{s3_url}/elsewhere/{{000000..000001}}.tar")
    assert (status, code) == (403, "forbidden_path") and "outside the allowed object-store prefixes" in message
    for parquet in (f"{s3_url}/elsewhere/ds/", f"{s3_url}/elsewhere/ds/train-00000-of-00001.parquet"):
        status, code, message = refused(parquet)  # a Hugging Face dataset's Parquet files, as shards
        assert (status, code) == (403, "forbidden_path") and "outside the allowed object-store prefixes" in message
    status, code, message = refused(f"s3://AKIA:{SECRET}@{s3_url[5:]}/datasets/digits/000000.tar")
    assert status == 422 and "credentials are never taken from a URL" in message and SECRET not in message

    job = client.wait(client.submit(body(pattern))["id"], timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    model = httpx.get(f"{running.api_url}/models/{job['model_id']}").json()
    assert model["classes"] == folder.classes
    holdout = sorted((data / "digits" / "holdout").glob("*/*.png"))[:3]
    assert len(client.predict(job["model_id"], holdout)) == 3
