"""Dataset uploads over HTTP: a zip or tar becomes a dataset a job can name by id; unsafe, oversized and garbage
archives are refused with a 4xx naming the cause and leave nothing on disk; datasets are private to their key.

The job end to end runs against the real processes (`stack`); the refusals run against the app in this process,
over real HTTP (uvicorn on loopback) where streaming matters (the upload limit), else with a TestClient.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from services.data.digits import write_digits
from storage.datasets import STAGING
from storage.settings import Settings
from tests.helpers import serve
from worker.launcher import free_port

A, B = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (value, 255 - value, 0)).save(buf, format="PNG")
    return buf.getvalue()


def folder(prefix: str = "pets/") -> dict[str, bytes]:
    return {f"{prefix}{cls}/{i}.png": png(i * 30 + k * 100) for k, cls in enumerate(("cat", "dog")) for i in range(4)}


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return buf.getvalue()


def tree_zip(root: Path) -> bytes:
    return zip_bytes({str(p.relative_to(root.parent)): p.read_bytes() for p in sorted(root.rglob("*.png"))})


def upload(client, data: bytes, filename: str = "ds.zip", headers: dict | None = None, url: str = "/datasets"):
    return client.post(url, files={"file": (filename, data, "application/octet-stream")}, headers=headers or {})


def error(r) -> tuple[int, str, str]:
    body = r.json()["error"]
    return r.status_code, body["code"], body["message"]


def assert_no_trace(settings: Settings) -> None:
    """A refused upload leaves no dataset folder and nothing in staging."""
    root = settings.datasets_dir
    assert [p.name for p in root.iterdir() if p.name != STAGING] == []
    assert list((root / STAGING).iterdir()) == []


@pytest.fixture
def small(tmp_path, redis_url) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", redis_url=redis_url, max_upload_mb=1, max_dataset_mb=1, max_dataset_files=50
    )


@pytest.fixture
def client(small) -> TestClient:
    return TestClient(create_app(small))


def test_upload_zip_and_tar_then_a_job_trains_on_it(stack, tmp_path):
    running, client = stack
    api = running.api_url
    write_digits(tmp_path / "digits", limit=60)
    r = upload(httpx, tree_zip(tmp_path / "digits" / "train"), "digits.zip", url=f"{api}/datasets")
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["id"].startswith("ds_") and ds["object"] == "dataset" and ds["format"] == "imagefolder"
    assert ds["classes"] == [str(d) for d in range(10)] and ds["num_images"] > 40 and ds["name"] == "digits.zip"
    assert httpx.get(f"{api}/datasets/{ds['id']}").json() == ds
    assert ds["id"] in [d["id"] for d in httpx.get(f"{api}/datasets").json()["data"]]

    tar = upload(httpx, tar_bytes(folder()), "pets.tgz", url=f"{api}/datasets")
    assert tar.status_code == 201 and tar.json()["classes"] == ["cat", "dog"] and tar.json()["num_images"] == 8

    body = {
        "dataset": {"id": ds["id"]},
        "backbone": {"name": "test_vit", "pretrained": False},
        "method": {"name": "linear"},
        "training": {"epochs": 1},
    }
    plan = httpx.post(f"{api}/jobs", params={"dry_run": "true"}, json=body, timeout=60)
    assert plan.status_code == 200 and plan.json()["classes"] == 10, plan.text
    job = client.submit(body)
    stored = job["spec"]["dataset"]
    assert stored["id"] == ds["id"] and Path(stored["path"]).is_relative_to(running.settings.datasets_dir / ds["id"])
    # while the job may still run, its dataset cannot be deleted; once it ended, it can
    deleted = httpx.delete(f"{api}/datasets/{ds['id']}")
    done = client.wait(job["id"], timeout_s=300)
    assert done["status"] == "succeeded", done["error"]
    if deleted.status_code != 204:
        assert error(deleted)[:2] == (409, "dataset_in_use")
        assert httpx.delete(f"{api}/datasets/{ds['id']}").status_code == 204
    assert httpx.get(f"{api}/datasets/{ds['id']}").status_code == 404
    assert not (running.settings.datasets_dir / ds["id"]).exists()
    r = httpx.post(f"{api}/jobs", json=body, timeout=30)
    assert error(r)[:2] == (404, "not_found") and "dataset.id" in error(r)[2]


def test_csv_manifest_archive(client):
    members = {
        **folder("img/"),
        "labels.csv": b"path,label\n" + b"".join(f"{name},{name.split('/')[1]}\n".encode() for name in folder("img/")),
    }
    r = upload(client, tar_bytes(members), "manifest.tar.gz")
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "csv" and r.json()["num_images"] == 8


@pytest.mark.parametrize("name", ["../evil.png", "/tmp/x.png", "pets/../../evil.png"])
def test_path_traversal_is_refused_naming_the_member(client, small, name):
    for data in (zip_bytes({**folder(), name: png(1)}), tar_bytes({**folder(), name: png(1)})):
        status, code, message = error(upload(client, data))
        assert (status, code) == (422, "unsafe_archive") and repr(name) in message
        assert_no_trace(small)
    assert not (small.data_path / "evil.png").exists() and not Path("/tmp/x.png").exists()


def test_symlink_in_tar_is_refused(client, small):
    link = tarfile.TarInfo("pets/cat/link.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    status, code, message = error(upload(client, tar_bytes(folder(), [link]), "ds.tgz"))
    assert (status, code) == (422, "unsafe_archive") and "symbolic link" in message and "pets/cat/link.png" in message
    assert_no_trace(small)


def test_zip_bomb_is_413_and_leaves_nothing(client, small):
    bomb = zip_bytes({**folder(), "pets/dog/bomb.png": bytes(16 << 20)})  # 16 MB of zeros in a few KB
    assert len(bomb) < 100_000
    status, code, message = error(upload(client, bomb))
    assert (status, code) == (413, "dataset_too_large") and "1 MB" in message
    assert_no_trace(small)
    many = zip_bytes({f"pets/cat/{i}.png": png(i) for i in range(60)})
    assert error(upload(client, many))[:2] == (413, "dataset_too_large")  # max_dataset_files 50


def test_upload_over_the_limit_is_cut_off_with_413(small):
    too_big = bytes(3 << 20)  # 3 MB against max_upload_mb 1
    with serve(create_app(small)) as url:
        r = httpx.post(f"{url}/datasets", files={"file": ("big.zip", too_big)}, timeout=30)
        assert error(r)[:2] == (413, "upload_too_large")

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while the body streams in
            for _ in range(48):
                yield bytes(64 << 10)

        r = httpx.post(f"{url}/datasets", content=chunks(), headers={"content-type": "application/zip"}, timeout=30)
        assert error(r)[:2] == (413, "upload_too_large")
        ok = httpx.post(f"{url}/datasets", files={"file": ("ds.zip", zip_bytes(folder()))}, timeout=30)
        assert ok.status_code == 201, ok.text  # the raw-body and multipart paths both stream to disk
    assert [p.name for p in small.datasets_dir.iterdir() if p.name != STAGING] == [ok.json()["id"]]
    assert list((small.datasets_dir / STAGING).iterdir()) == []


@pytest.mark.parametrize(
    ("data", "code", "needle"),
    [
        (b"definitely not an archive" * 40, "invalid_archive", "not a zip or tar"),
        (b"", "invalid_archive", "empty"),
        (b"PK\x03\x04garbage" * 10, "invalid_archive", "zip"),
        (zip_bytes({"pets/cat/1.png": png(1), "pets/cat/2.png": png(2)}), "invalid_dataset", "at least 2"),
        (zip_bytes({"readme.txt": b"hello"}), "invalid_dataset", "no images"),
    ],
    ids=["text", "empty", "bad-zip", "one-class", "no-images"],
)
def test_unusable_uploads_are_4xx_naming_the_cause(client, small, data, code, needle):
    status, got, message = error(upload(client, data))
    assert (status, got) == (422, code) and needle in message, message
    assert_no_trace(small)


def test_an_upload_while_the_store_is_unreachable_is_503_and_leaves_nothing(
    tmp_path, redis_url, s3_server, monkeypatch
):
    from s3fs import S3FileSystem

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    S3FileSystem.clear_instance_cache()
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, store_url="s3://down/sidetune")
    try:
        r = upload(TestClient(create_app(settings)), zip_bytes(folder()))
    finally:
        S3FileSystem.clear_instance_cache()
    assert error(r)[:2] == (503, "storage_unavailable") and "s3://down/sidetune" in error(r)[2], r.text
    assert r.headers["retry-after"] == "5"
    assert_no_trace(settings)


def test_multipart_without_a_file_field_is_422(client):
    r = client.post("/datasets", files={"archive": ("ds.zip", zip_bytes(folder()))})
    assert error(r)[:2] == (422, "invalid_request") and "`file`" in error(r)[2]


def test_datasets_are_private_to_their_key(tmp_path, redis_url):
    settings = Settings(
        data_dir=tmp_path, redis_url=redis_url, api_keys=["key-a", "key-b"], allowed_roots=[tmp_path / "images"]
    )
    client = TestClient(create_app(settings))
    assert upload(client, zip_bytes(folder())).status_code == 401
    ds = upload(client, zip_bytes(folder()), headers=A).json()
    assert client.get(f"/datasets/{ds['id']}", headers=A).status_code == 200
    assert client.get(f"/datasets/{ds['id']}", headers=B).status_code == 404
    assert ds["id"] not in [d["id"] for d in client.get("/datasets", headers=B).json()["data"]]
    assert client.delete(f"/datasets/{ds['id']}", headers=B).status_code == 404

    body = {
        "dataset": {"id": ds["id"]},
        "backbone": {"name": "test_vit", "pretrained": False},
        "method": {"name": "linear"},
    }
    status, code, message = error(client.post("/jobs", json=body, headers=B))
    assert (status, code) == (404, "not_found") and "dataset.id" in message
    # nor by its path: uploaded datasets are reached by id only, which checks the key
    by_path = {**body, "dataset": {"path": str(settings.datasets_dir / ds["id"] / "files" / "pets")}}
    assert error(client.post("/jobs", json=by_path, headers=B))[:2] == (403, "forbidden_path")
    # key A plans it, though the allowed roots leave out the data dir: its upload is read through its id
    plan = client.post("/jobs", params={"dry_run": "true"}, json=body, headers=A)
    assert plan.status_code == 200 and plan.json()["classes"] == 2, plan.text
    assert client.delete(f"/datasets/{ds['id']}", headers=A).status_code == 204
    assert client.get(f"/datasets/{ds['id']}", headers=A).status_code == 404


def test_dataset_spec_needs_exactly_one_of_path_and_id(client, small):
    base = {"backbone": {"name": "test_vit"}, "method": {"name": "linear"}}
    status, code, message = error(client.post("/jobs", json={**base, "dataset": {}}))
    assert (status, code) == (422, "invalid_request") and "dataset.path" in message and "dataset.id" in message
    both = {**base, "dataset": {"path": "/x", "id": "ds_0123abcd"}}
    assert error(client.post("/jobs", json=both))[:2] == (422, "invalid_request")
    assert error(client.post("/jobs", json={**base, "dataset": {"id": "../etc"}}))[:2] == (422, "invalid_request")
    missing = error(client.post("/jobs", json={**base, "dataset": {"id": "ds_0123abcd"}}))
    assert missing[:2] == (404, "not_found") and "dataset.id" in missing[2]
