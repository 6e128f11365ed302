"""Two API keys against the real processes (`sidetune serve`'s stack, real HTTP), as issue 19's hostile trial tried
them: key A cannot read the service's own folders (the data dir, uploads, the cache, models, Redis's files, logs) or
key B's upload through any path field, and no answer names anything of B's (classes, files, tensors, ids); a spec
stored earlier, or a folder that changed after submission, is refused by the workers (`forbidden_path` naming the
field); an upload is read through its id only, by its owner (`dataset.id`, `dataset.test_id`); class names that
collide after NFC normalisation or case folding are refused in an upload, a folder and a manifest, naming both."""

from __future__ import annotations

import io
import os
import shutil
import signal
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image
from safetensors import safe_open

from api.deps import owner_of
from services.data.digits import write_digits
from storage.redis import JobStore
from storage.settings import Settings
from tests.helpers import failed_job, plan_failure
from worker.celery_app import enqueue_job, make_app
from worker.launcher import Stack, free_port

KEYS = ["paths-key-A-3c1f", "paths-key-B-9e07"]
A, B = ({"Authorization": f"Bearer {key}"} for key in KEYS)
BACKBONE = {"name": "test_vit", "pretrained": False, "image_size": 32}
B_CLASSES = ("bsecretcat", "bsecretdog")
FIGURES = {"tried": 0, "refused": 0}  # the hostile paths of this module, for the closing note


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (value, 255 - value, 7)).save(buf, format="PNG")
    return buf.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def images(classes: tuple[str, ...], n: int, prefix: str = "pets/", start: int = 0) -> dict[str, bytes]:
    return {
        f"{prefix}{c}/bprivate{start + i}.png": png(40 * k + 9 * i + start)
        for k, c in enumerate(classes)
        for i in range(n)
    }


def upload(url: str, data: bytes, headers: dict) -> httpx.Response:
    return httpx.post(f"{url}/datasets", files={"file": ("ds.zip", data)}, headers=headers, timeout=60)


def wait(url: str, job_id: str, headers: dict, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = httpx.get(f"{url}/jobs/{job_id}", headers=headers, timeout=30).json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        time.sleep(0.3)


@dataclass
class World:
    running: Stack
    url: str
    data: Path
    b_upload: Path  # where B's uploaded dataset lies (its `files/pets`)
    b_weights: Path
    a_upload: Path
    foreign: list[str]  # every name of B's that A must never read
    b_job: dict  # B's job on its upload, with its other upload as the test set (`dataset.test_id`)
    test_upload_in_use: int  # the status of deleting that test set while the job ran


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("paths")
    settings = Settings(
        data_dir=data,
        embedded_redis_port=free_port(),
        api_port=free_port(),
        inference_port=free_port(),
        device="cpu",
        api_keys=KEYS,
    )
    write_digits(data / "mydata", limit=60)  # A's own dataset in the data dir: train/ and holdout/, 10 classes
    with Stack(settings) as running:
        url = running.api_url
        b = upload(url, zip_of(images(B_CLASSES, 4)), B).json()
        b_test = upload(url, zip_of(images(B_CLASSES, 2, start=50)), B).json()
        a = upload(url, zip_of(images(("x", "y"), 2, start=100)), A).json()
        # B trains on its upload, its second upload the separate test set (`dataset.test_id`)
        spec = {"dataset": {"id": b["id"], "test_id": b_test["id"]}, "backbone": BACKBONE, "method": {"name": "linear"}}
        submitted = httpx.post(f"{url}/jobs", json=spec, headers=B, timeout=60)
        assert submitted.status_code == 201, submitted.text
        in_use = httpx.delete(f"{url}/datasets/{b_test['id']}", headers=B, timeout=30).status_code
        job = wait(url, submitted.json()["id"], B)
        assert job["status"] == "succeeded", job
        weights = data / "artifacts" / "models" / job["model_id"] / "weights.safetensors"
        with safe_open(weights, "np") as f:
            tensors = list(f.keys())
        cache = [p.name for p in (data / "cache").iterdir()]
        foreign = [b["id"], b_test["id"], job["id"], job["model_id"], *B_CLASSES, "bprivate", *tensors, *cache]
        b_upload = data / "datasets" / b["id"] / "files" / "pets"
        # A's folders that reach into B's: a linked class folder, a linked file, manifest rows, a linked checkpoint
        shutil.copytree(data / "mydata" / "train" / "0", data / "mylinks" / "zero")
        (data / "mylinks" / "one").symlink_to(b_upload / B_CLASSES[0])
        shutil.copytree(data / "mydata" / "train" / "1", data / "linkfile" / "one")
        shutil.copytree(data / "mydata" / "train" / "2", data / "linkfile" / "two")
        (data / "linkfile" / "one" / "evil.png").symlink_to(b_upload / B_CLASSES[1] / "bprivate0.png")
        (data / "m.csv").write_text(
            f"path,label\n{b_upload.relative_to(data)}/{B_CLASSES[0]}/bprivate0.png,a\nmydata/train/1/0001.png,b\n"
        )
        (data / "alias").symlink_to(data / "datasets" / b["id"])
        (data / "mydata" / "ckpt.safetensors").symlink_to(weights)
        a_upload = data / "datasets" / a["id"] / "files" / "pets"
        yield World(running, url, data, b_upload, weights, a_upload, foreign, job, in_use)


def _hostile(w: World) -> list[tuple[str, str, Path | str]]:
    """(what, field, path): every path of the hostile trial and its kin."""
    d = w.data
    return [
        ("the data dir", "dataset.path", d),
        ("the uploads folder", "dataset.path", d / "datasets"),
        ("the artifacts", "dataset.path", d / "artifacts"),
        ("the models", "dataset.path", d / "artifacts" / "models"),
        ("the feature cache", "dataset.path", d / "cache"),
        ("Redis's files", "dataset.path", d / "redis"),
        ("the logs", "dataset.path", d / "logs"),
        ("the staging folder", "dataset.path", d / "datasets" / ".staging"),
        ("B's upload by path", "dataset.path", w.b_upload),
        ("B's upload through ..", "dataset.path", f"{d}/mydata/../datasets/{w.b_upload.relative_to(d / 'datasets')}"),
        ("a link to B's upload", "dataset.path", d / "alias"),
        ("a class folder linked into B's upload", "dataset.path", d / "mylinks"),
        ("a file linked into B's upload", "dataset.path", d / "linkfile"),
        ("manifest rows in B's upload", "dataset.path", d / "m.csv"),
        ("above the data dir", "dataset.path", d.parent),
        ("A's own upload by path", "dataset.path", w.a_upload),
        ("B's upload as the test set", "dataset.test", w.b_upload),
        ("the data dir as the test set", "dataset.test", d),
        ("a linked class folder as the test set", "dataset.test", d / "mylinks"),
        ("B's model weights", "backbone.checkpoint", w.b_weights),
        ("a link to B's model weights", "backbone.checkpoint", d / "mydata" / "ckpt.safetensors"),
        ("a missing file among the models", "backbone.checkpoint", w.b_weights.parent / "other.safetensors"),
    ]


def _spec(w: World, field: str | None = None, path: Path | str | None = None) -> dict:
    spec = {
        "dataset": {"path": str(w.data / "mydata" / "train")},
        "backbone": dict(BACKBONE),
        "method": {"name": "linear"},
    }
    if field is not None:
        part, name = field.split(".")
        spec[part][name] = str(path)
    return spec


def _no_foreign_name(w: World, text: str, given: str = "") -> None:
    """Nothing of B's in `text`, once the path the caller gave (echoed back) is taken out."""
    text = text.replace(given, "")
    assert not [name for name in w.foreign if name in text], text


# Found only by reading the dataset (a linked class folder or file, a manifest's rows), which the request no longer
# does: refused by the plan step in a worker (the job fails `forbidden_path`), and by a dry run at once (403).
READ_BY_PLAN = {
    "a class folder linked into B's upload",
    "a file linked into B's upload",
    "manifest rows in B's upload",
    "a linked class folder as the test set",
}


def test_every_hostile_path_is_refused_at_submission_naming_nothing_of_b(world: World) -> None:
    jobs_before = len(httpx.get(f"{world.url}/jobs", params={"limit": 100}, headers=A, timeout=30).json()["data"])
    for what, field, path in _hostile(world):
        FIGURES["tried"] += 1
        for dry_run in ("false", "true"):
            r = httpx.post(
                f"{world.url}/jobs", params={"dry_run": dry_run}, json=_spec(world, field, path), headers=A, timeout=60
            )
            if what in READ_BY_PLAN and dry_run == "false":
                assert r.status_code == 201, (what, r.text)
                job = failed_job(world.url, r.json()["id"], A)
                error = job["error"]
                events = httpx.get(f"{world.url}/jobs/{job['id']}/events", headers=A, timeout=30).text
                _no_foreign_name(world, str(job) + events, str(path))
            else:
                assert r.status_code == 403, (what, r.text)
                error = r.json()["error"]
                _no_foreign_name(world, r.text, str(path))
            assert error["code"] == "forbidden_path" and error["message"].startswith(f"{field}: "), (what, error)
            assert "service's own folders" in error["message"] or "outside the allowed roots" in error["message"]
        FIGURES["refused"] += 1
    jobs_after = httpx.get(f"{world.url}/jobs", params={"limit": 100}, headers=A, timeout=30).json()["data"]
    assert len(jobs_after) == jobs_before + len(READ_BY_PLAN)  # only those, each failed by its plan step


def test_another_keys_upload_by_id_is_not_found(world: World) -> None:
    b_id = world.b_upload.parent.parent.name
    for field in ("id", "test_id"):
        FIGURES["tried"] += 1
        spec = _spec(world)
        if field == "id":
            del spec["dataset"]["path"]
        spec["dataset"][field] = b_id
        r = httpx.post(f"{world.url}/jobs", json=spec, headers=A, timeout=60)
        assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found"), r.text
        assert r.json()["error"]["message"].startswith(f"dataset.{field}: ")
        _no_foreign_name(world, r.text, b_id)
        FIGURES["refused"] += 1


def test_the_workers_refuse_a_stored_spec_and_a_folder_changed_after_submission(world: World) -> None:
    """Specs stored as the API accepted them before this check (the data dir as a dataset, B's weights as a
    checkpoint) and folders swapped after a 201 (the dataset itself, a class folder of the test set): each job fails
    in its worker with `forbidden_path`, the message naming the field and nothing of B's."""
    running, url, d = world.running, world.url, world.data
    store = JobStore.from_url(running.settings.broker_url)
    celery = make_app(running.settings)
    expected: dict[str, str] = {}
    for field, path in (("dataset.path", d), ("backbone.checkpoint", world.b_weights)):
        job = store.create_job(_spec(world, field, path), owner=owner_of(KEYS[0]))
        enqueue_job(celery, job["id"])
        expected[job["id"]] = field

    # the dataset: swapped for a link to the uploads folder while the extract worker is held (so it reads it after)
    shutil.copytree(d / "mydata" / "train", d / "mycopy")
    worker = running.procs["extract-worker"].pid
    os.kill(worker, signal.SIGSTOP)
    try:
        r = httpx.post(f"{url}/jobs", json=_spec(world, "dataset.path", d / "mycopy"), headers=A, timeout=60)
        assert r.status_code == 201, r.text
        shutil.rmtree(d / "mycopy")
        (d / "mycopy").symlink_to(d / "datasets")
    finally:
        os.kill(worker, signal.SIGCONT)
    expected[r.json()["id"]] = "dataset.path"

    # a class folder of the test set: linked into B's upload after submission, read when training has ended
    shutil.copytree(d / "mydata" / "holdout", d / "mytest")
    r = httpx.post(f"{url}/jobs", json=_spec(world, "dataset.test", d / "mytest"), headers=A, timeout=60)
    assert r.status_code == 201, r.text
    shutil.rmtree(d / "mytest" / "3")
    (d / "mytest" / "3").symlink_to(world.b_upload / B_CLASSES[0])
    expected[r.json()["id"]] = "dataset.test"

    for job_id, field in expected.items():
        FIGURES["tried"] += 1
        job = wait(url, job_id, A)
        assert job["status"] == "failed" and job["error"]["code"] == "forbidden_path", job
        assert job["error"]["message"].startswith(f"{field}: "), job["error"]
        events = httpx.get(f"{url}/jobs/{job_id}/events", headers=A, timeout=30).text
        _no_foreign_name(world, job["error"]["message"] + events, str(job["spec"]["backbone"].get("checkpoint")))
        FIGURES["refused"] += 1


def test_an_upload_is_read_through_its_id_as_a_test_set_too(world: World) -> None:
    """B's job (the module's fixture) on its upload, with its second upload as the test set (`dataset.test_id`)."""
    job, url = world.b_job, world.url
    test_id = job["spec"]["dataset"]["test_id"]
    assert job["spec"]["dataset"]["test"].endswith(f"{test_id}/files/pets")  # the API put its path in
    assert world.test_upload_in_use == 409  # deleting it was refused while the job needed it
    evaluation = httpx.get(f"{url}/models/{job['model_id']}/evaluation", headers=B, timeout=30).json()
    assert evaluation["split"] == "test" and evaluation["images"] == 4, evaluation


NFC, NFD = "caf\u00e9", "cafe\u0301"


def test_class_names_that_collide_are_refused_naming_both(world: World) -> None:
    """In an upload (a zip), in a folder on the server and in a manifest: NFC against NFD, and case."""
    url, d = world.url, world.data
    both = r"'cafe\u0301' (NFD) and 'caf\xe9' (NFC) are one name in two Unicode forms"
    for classes, named in (((NFC, NFD, "tea"), both), (("Tea", "tea"), "'Tea' and 'tea' differ only in case")):
        r = upload(url, zip_of(images(classes, 2)), A)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_dataset"), r.text
        assert f"class folders {named}" in r.json()["error"]["message"]
    for digit, c in (("4", NFC), ("5", NFD)):
        shutil.copytree(d / "mydata" / "train" / digit, d / "unicode" / c)
    assert len(os.listdir(d / "unicode")) == 2
    one, two = (next((d / "mydata" / "train" / c).iterdir()).relative_to(d) for c in "12")
    (d / "labels.csv").write_text(f"path,label\n{one},Tea\n{two},TEA\n")
    for path, named in ((d / "unicode", f"class folders {both}"), (d / "labels.csv", "labels 'TEA' and 'Tea'")):
        error = plan_failure(url, _spec(world, "dataset.path", path), headers=A)  # the plan step reads the folder
        assert error["code"] == "invalid_dataset" and error["message"].startswith(f"dataset.path: {named}"), error


def test_figures(world: World, test_artifacts: Path) -> None:
    """The closing note's figures: hostile paths tried and refused (runs last in this module)."""
    (test_artifacts / "hostile_paths.txt").write_text(f"tried={FIGURES['tried']} refused={FIGURES['refused']}\n")
    assert FIGURES["tried"] == FIGURES["refused"]
