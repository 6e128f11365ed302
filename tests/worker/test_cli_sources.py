"""`sidetune submit` naming where the data lives with options instead of a spec file (worker/commands/submit.py), as
subprocesses against the real processes: WebDataset shards on the server (`wds://`, labels in a `.json` field) trained
to a model; shards and a JSONL manifest in an object store (a moto S3 server), a Hugging Face `save_to_disk` folder
with its own column names, and a Hub id the server cannot reach (offline), each planned by the server (`--dry-run`)
through a second API process started with SIDETUNE_ALLOWED_PREFIXES; the options over a spec file; usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from services.data.datasets import read_imagefolder
from storage.redis import JobStore
from tests.shards import write_shards
from worker.cli import _parser, main
from worker.commands.submit import build_spec
from worker.launcher import Stack, free_port

MODEL = ("--backbone", "test_vit", "--no-pretrained", "--method", "linear")


def _json_samples(folder: Path) -> list[tuple[str, dict[str, bytes]]]:
    """The ImageFolder's images as WebDataset samples whose label is the field `digit` of a `.json` file."""
    digits = read_imagefolder(folder)
    return [
        (f"s{i:05d}", {"png": p.read_bytes(), "json": json.dumps({"digit": digits.classes[label]}).encode()})
        for i, (p, label) in enumerate(zip(digits.paths, digits.labels.tolist(), strict=True))
    ]


def test_the_spec_from_options_alone_or_over_a_file(tmp_path: Path, capsys) -> None:
    parse = _parser().parse_args
    spec = build_spec(parse(["submit", "--dataset", "wds:///d/{000000..000003}.tar", "--label-key", "json", *MODEL]))
    assert spec["dataset"] == {
        "path": "/d/{000000..000003}.tar",
        "format": "webdataset",
        "webdataset": {"label_key": "json"},
    }
    assert spec["backbone"] == {"name": "test_vit", "pretrained": False} and spec["method"] == {"name": "linear"}
    spec = build_spec(parse(["submit", "--dataset", "wds://s3://b/s/{0..3}.tar", "--classes", "a, b", *MODEL]))
    assert spec["dataset"] == {
        "path": "s3://b/s/{0..3}.tar",
        "format": "webdataset",
        "webdataset": {"classes": ["a", "b"]},
    }
    args = ["submit", "--dataset", "hf://org/name", "--image-column", "img", "--hf-splits", "draw", *MODEL]
    assert build_spec(parse(args))["dataset"] == {
        "path": "hf://org/name",
        "huggingface": {"image_column": "img", "splits": "draw"},
    }

    file = tmp_path / "spec.json"
    base = {"path": "/old.csv", "format": "csv", "val_fraction": 0.3, "huggingface": {"label_column": "y"}}
    file.write_text(
        json.dumps(
            {"dataset": base, "backbone": {"name": "b", "pretrained": False}, "method": {"name": "losa", "rank": 4}}
        )
    )
    spec = build_spec(parse(["submit", str(file), "--dataset", "ds_0a1b", "--image-column", "img", "--epochs", "3"]))
    # the new location replaces the old and its format; the rest of the file's dataset stays, its columns merged
    assert spec["dataset"] == {
        "id": "ds_0a1b",
        "val_fraction": 0.3,
        "huggingface": {"label_column": "y", "image_column": "img"},
    }
    assert spec["backbone"] == {"name": "b", "pretrained": False} and spec["method"] == {"name": "losa", "rank": 4}
    assert spec["training"] == {"epochs": 3}

    assert main(["submit", "--dataset", "wds://relative/x.tar", *MODEL]) == 2
    assert "`wds://` takes a server path" in capsys.readouterr().err
    assert main(["submit", "--dataset", "/data/x"]) == 2
    assert "missing --backbone and --method" in capsys.readouterr().err


def test_a_hub_ids_revision_and_config_by_options() -> None:
    args = ["submit", "--dataset", "hf://org/name", "--hf-revision", "v1.0", "--hf-config", "small", *MODEL]
    spec = build_spec(_parser().parse_args(args))
    assert spec["dataset"] == {"path": "hf://org/name", "huggingface": {"revision": "v1.0", "config": "small"}}


def test_local_shards_named_by_options_train_a_model(stack) -> None:
    running, client = stack
    data = running.settings.data_path / "datasets"
    samples = _json_samples(data / "digits" / "train")[::3]  # 5 a class: a quick job on a busy machine
    pattern = write_shards(data / "cli-shards", samples, per_shard=20)
    options = ("--label-key", "json", "--label-field", "digit", "--epochs", "1")
    done = cli_at(running.api_url, "submit", "--dataset", f"wds://{pattern}", *MODEL, *options, "--wait", "--json")
    job = json.loads(done.stdout)
    assert done.returncode == 0 and job["status"] == "succeeded", (job["error"], done.stderr)
    dataset = job["spec"]["dataset"]
    assert dataset["path"] == pattern and dataset["format"] == "webdataset"
    assert dataset["webdataset"]["label_key"] == "json" and dataset["webdataset"]["label_field"] == "digit"
    assert client.model(job["model_id"])["classes"] == read_imagefolder(data / "digits" / "train").classes
    record = JobStore.from_url(running.settings.broker_url).get_job(job["id"])
    assert record["dataset_format"] == "webdataset" and job["dataset_format"] == "webdataset"
    assert record["handed_off"] == "train"  # each hand-off marked once sent (worker/tasks.py)


@pytest.fixture(scope="module")
def sources_api(stack, s3_server: str, tmp_path_factory: pytest.TempPathFactory):
    """A second API process on `stack`'s Redis and store, admitting `<bucket>/cli/` (SIDETUNE_ALLOWED_PREFIXES) and
    with the Hub offline (HF_HUB_OFFLINE=1); yields (its URL, the prefix). Its dry runs plan in the request."""
    running, _ = stack
    prefix = f"{s3_server}/cli"
    settings = running.settings.model_copy(
        update={"redis_url": running.redis.url, "api_port": free_port(), "allowed_prefixes": [f"{prefix}/"]}
    )
    settings.model_fields_set.update({"redis_url", "allowed_prefixes"})
    api = Stack(settings, log_dir=tmp_path_factory.mktemp("sources-api-logs"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
        api.spawn("api", "api")
    try:
        api.wait_ready(120, urls=[f"{api.api_url}/readyz"])
        yield api.api_url, prefix
    finally:
        api.stop()


def cli_at(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args, "--url", url], capture_output=True, text=True, timeout=600
    )


def _plan(url: str, *args: str) -> dict:
    r = cli_at(url, "submit", *args, *MODEL, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_object_store_and_hugging_face_sources_named_by_options(stack, sources_api, tmp_path: Path) -> None:
    running, _ = stack
    url, prefix = sources_api
    digits = read_imagefolder(running.settings.data_path / "datasets" / "digits" / "train")
    fs, root = fsspec.core.url_to_fs(prefix)

    write_shards(tmp_path / "shards", _json_samples(running.settings.data_path / "datasets" / "digits" / "train"), 60)
    fs.put(str(tmp_path / "shards"), f"{root}/shards", recursive=True)
    count = len(list((tmp_path / "shards").glob("*.tar")))
    shards = f"{prefix}/shards/{{000000..{count - 1:06d}}}.tar"
    assert _plan(url, "--dataset", shards, "--label-key", "json", "--label-field", "digit")["images"] == len(digits)

    chosen = [(p, digits.classes[label]) for p, label in zip(digits.paths, digits.labels.tolist(), strict=True)][::3]
    rows = []
    for i, (p, label) in enumerate(chosen):
        fs.put(str(p), f"{root}/images/{i}.png")
        rows.append(json.dumps({"path": f"{prefix}/images/{i}.png", "label": label}))
    with fs.open(f"{root}/train.jsonl", "w") as f:
        f.write("\n".join(rows) + "\n")
    assert _plan(url, "--dataset", f"{prefix}/train.jsonl")["images"] == len(chosen)

    datasets = pytest.importorskip("datasets")
    saved = running.settings.data_path / "datasets" / "cli-saved"
    features = datasets.Features({"img": datasets.Image(), "digit": datasets.ClassLabel(names=digits.classes)})
    rows_hf = {
        "img": [{"bytes": p.read_bytes(), "path": p.name} for p in digits.paths],
        "digit": digits.labels.tolist(),
    }
    datasets.Dataset.from_dict(rows_hf, features=features).save_to_disk(saved)
    plan = _plan(url, "--dataset", str(saved), "--image-column", "img", "--label-column", "digit")
    assert plan["images"] == len(digits)

    hub = cli_at(url, "submit", "--dataset", "hf://sidetune-tests/digits", *MODEL, "--dry-run")
    assert hub.returncode == 4 and "the Hugging Face Hub dataset" in hub.stderr and "offline" in hub.stderr, hub.stderr
    outside = cli_at(url, "submit", "--dataset", f"{prefix}2/x.jsonl", *MODEL)
    assert outside.returncode == 4 and "HTTP 403" in outside.stderr, outside.stderr
