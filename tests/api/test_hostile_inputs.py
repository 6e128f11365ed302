"""The hostile trial's inputs against the real API over HTTP (and a real Redis): each must be refused at submission
with a clear 4xx naming the field or the file, never a 5xx. What only reading the dataset finds (a linked file, a
manifest's rows) is found by the job's plan step, which runs in a worker since issue 22 (services/jobs/planning.py):
there a dry run answers the 4xx, and the job submitted fails with its code and message before anything runs.
The figures (inputs tried, refused with a 4xx, 5xx seen) are printed (`pytest -s`)."""

from __future__ import annotations

import copy
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from api.main import create_app
from storage.settings import Settings
from tests.helpers import plan_now, serve


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, redis_url: str):
    root = tmp_path_factory.mktemp("hostile")
    allowed, outside = root / "allowed", root / "outside"
    for folder in (allowed / "ds" / "a", allowed / "ds" / "b", outside / "loot"):
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(folder / f"{i}.png")
    (allowed / "linked_class" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(allowed / "linked_class" / "a" / "0.png")
    (allowed / "linked_class" / "b").symlink_to(outside / "loot")
    for c in ("a", "b"):
        (allowed / "linked_file" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(allowed / "linked_file" / c / "0.png")
    (allowed / "linked_file" / "a" / "passwd.png").symlink_to("/etc/passwd")
    (allowed / "csv").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(allowed / "csv" / f"{i}.png")
    (allowed / "csv" / "missing.csv").write_text("path,label\n0.png,a\n1.png,b\n9.png,b\n")
    (allowed / "csv" / "empty.csv").write_text("path,label\n")
    settings = Settings(data_dir=root / "data", redis_url=redis_url.rsplit("/", 1)[0] + "/6", allowed_roots=[allowed])
    app = create_app(settings)
    with serve(app) as url:
        yield url, allowed, app


def _spec(allowed: Path, **changes) -> dict:
    spec = {
        "dataset": {"path": str(allowed / "ds")},
        "backbone": {"name": "test_vit", "pretrained": False},
        "method": {"name": "linear"},
        "training": {"epochs": 1},
    }
    spec = copy.deepcopy(spec)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return spec


# (what, changes to a valid spec or a request, what the answer must mention)
JOBS = [
    ("lr inf", {"training.lr": "inf"}, "training.lr"),
    ("lr nan", {"training.lr": "nan"}, "training.lr"),
    ("lr negative", {"training.lr": -1}, "training.lr"),
    ("lr 1e308", {"training.lr": 1e308}, "training.lr"),
    ("weight decay nan", {"training.weight_decay": "nan"}, "training.weight_decay"),
    ("warmup inf", {"training.warmup_epochs": "inf"}, "training.warmup_epochs"),
    ("seed 2^64", {"training.seed": 2**64}, "training.seed"),
    ("split seed -1", {"dataset.split_seed": -1}, "dataset.split_seed"),
    ("init seed 2^32", {"backbone.init_seed": 2**32}, "backbone.init_seed"),
    ("lora alpha inf", {"method": {"name": "lora", "alpha": "inf"}}, "method.alpha"),
    ("apla subset seed 2^40", {"method": {"name": "apla", "subset_seed": 2**40}}, "method.subset_seed"),
    ("resnet18 with image_size", {"backbone.name": "resnet18", "backbone.image_size": 224}, "resnet18"),
    ("convnext_tiny", {"backbone.name": "convnext_tiny"}, "convnext_tiny"),
    ("unknown backbone", {"backbone.name": "vit_gigantic_patch99_1"}, "backbone.name"),
    ("NUL in dataset path", {"dataset.path": "/tmp/a\x00b"}, "dataset.path"),
    ("newline in dataset path", {"dataset.path": "/tmp/a\nb"}, "dataset.path"),
    ("escape in checkpoint path", {"backbone.checkpoint": "/tmp/\x1b[31mx"}, "backbone.checkpoint"),
    ("class folder linked outside", {"dataset.path": "linked_class"}, "linked_class/b resolves to"),
    ("image linked to /etc/passwd", {"dataset.path": "linked_file"}, "passwd.png resolves to /etc/passwd"),
    ("CSV row with a missing file", {"dataset.path": "csv/missing.csv"}, "missing.csv line 4"),
    ("empty CSV", {"dataset.path": "csv/empty.csv"}, "empty.csv has no rows"),
    ("path outside the roots", {"dataset.path": "/etc"}, "outside the allowed roots"),
    ("1025 shards", {"extraction.shards": 1025}, "extraction.shards"),
]
FOUND_BY_READING = {
    "class folder linked outside",
    "image linked to /etc/passwd",
    "CSV row with a missing file",
    "empty CSV",
}
QUERIES = [
    ("events after 2^63-2", "GET", "/jobs/job_x/events?after=9223372036854775806", "after"),
    ("events after -1", "GET", "/jobs/job_x/events?after=-1", "after"),
    ("jobs limit 10^20", "GET", "/jobs?limit=100000000000000000000", "limit"),
    ("dry run of resnet18", "POST", "/jobs?dry_run=true", "resnet18"),
]
FIGURES = {"tried": 0, "refused_4xx": 0, "5xx": 0}


@pytest.mark.parametrize(("what", "changes", "named"), JOBS, ids=[j[0] for j in JOBS])
def test_a_hostile_job_spec_is_refused_at_submission(api, what, changes, named) -> None:
    url, allowed, app = api
    local = {k: str(allowed / v) for k, v in changes.items() if k == "dataset.path" and not v.startswith("/")}
    body = _spec(allowed, **{**changes, **local})
    if what not in FOUND_BY_READING:
        _check(httpx.post(f"{url}/jobs", json=body, timeout=30), named)
        return
    _check(httpx.post(f"{url}/jobs", params={"dry_run": "true"}, json=body, timeout=30), named)
    r = httpx.post(f"{url}/jobs", json=body, timeout=30)
    assert r.status_code == 201 and r.json()["status"] == "planning", r.text
    job = plan_now(app, r.json()["id"])
    assert job["status"] == "failed" and named in job["error"]["message"], job


@pytest.mark.parametrize(("what", "method", "path", "named"), QUERIES, ids=[q[0] for q in QUERIES])
def test_a_hostile_request_is_refused(api, what, method, path, named) -> None:
    url, allowed, _ = api
    body = _spec(allowed, **{"backbone.name": "resnet18"}) if method == "POST" else None
    _check(httpx.request(method, f"{url}{path}", json=body, timeout=30), named)


def _check(r: httpx.Response, named: str) -> None:
    FIGURES["tried"] += 1
    FIGURES["5xx"] += r.status_code >= 500
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["code"] and named in error["message"], error
    FIGURES["refused_4xx"] += 1


def test_figures() -> None:
    print(
        f"\nhostile inputs: {FIGURES['tried']} tried, {FIGURES['refused_4xx']} refused with a clear 4xx, "
        f"{FIGURES['5xx']} 5xx"
    )
    assert FIGURES["tried"] == len(JOBS) + len(QUERIES) and FIGURES["5xx"] == 0
