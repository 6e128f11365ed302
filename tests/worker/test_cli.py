"""The `sidetune` CLI against the running stack, as subprocesses: submit --wait, jobs, predict, every verb of jobs,
models and datasets with --json, report, export; `--help` with an example everywhere; and `params`, offline."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import shaped
from worker import api_types as views
from worker.cli import main


def run_cli(stack, *args: str) -> subprocess.CompletedProcess:
    running, _ = stack
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args, "--url", running.api_url],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_submit_wait_then_jobs_and_predict(stack, tmp_path):
    running, _ = stack
    digits = running.settings.data_path / "datasets" / "digits"
    spec = {
        "name": "cli",
        "dataset": {"path": str(digits / "train")},
        "method": {"name": "linear"},
        "backbone": {"name": "test_vit", "pretrained": False},
        "training": {"epochs": 2, "lr": 0.05},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = run_cli(stack, "submit", str(tmp_path / "spec.json"), "--wait")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout[done.stdout.index("{") :])
    assert result["status"] == "succeeded" and result["model_id"].startswith("model_")

    listing = run_cli(stack, "jobs")
    assert result["id"] in listing.stdout

    images = sorted((digits / "holdout").glob("*/*.png"))[:3]
    predicted = run_cli(stack, "predict", result["model_id"], *map(str, images))
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.split("\t")[1].isdigit() for line in lines)


def test_submit_reports_a_bad_spec(stack, tmp_path):
    (tmp_path / "bad.json").write_text(
        json.dumps({"dataset": {"path": "/etc"}, "backbone": {"name": "test_vit"}, "method": {"name": "linear"}})
    )
    r = run_cli(stack, "submit", str(tmp_path / "bad.json"))
    assert r.returncode == 4 and "HTTP 403" in r.stderr and "outside the allowed roots" in r.stderr


def test_params_prints_the_trainable_count_last(capsys):
    assert main(["params", "--backbone", "vit_base_patch16_224", "--method", "losa", "--rank", "8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert int(out[-1]) == 98_526 + 12  # the paper's count plus LoSA's 12 per-layer scales
    assert "98,526 without them" in out[-3]


def test_params_vit_g_with_fewer_layers(capsys):
    args = ["params", "--backbone", "vit_giant_patch14_224", "--method", "losa", "--rank", "64", "--layers", "4"]
    assert main(args) == 0
    assert int(capsys.readouterr().out.strip().splitlines()[-1]) - 4 == pytest.approx(431_000, rel=0.01)


def test_params_reports_a_bad_option(capsys):
    assert main(["params", "--backbone", "vit_base_patch16_224", "--method", "linear", "--rank", "4"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "rank" in captured.err and "Extra inputs" in captured.err


def cli_json(stack, *args: str):
    r = run_cli(stack, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_every_verb_against_the_stack(stack, tmp_path):
    running, client = stack
    digits = running.settings.data_path / "datasets" / "digits"
    spec = {
        "dataset": {"path": str(digits / "train")},
        "backbone": {"name": "test_vit", "pretrained": False},
        "method": {"name": "losa", "rank": 4},
        "training": {"epochs": 1, "lr": 0.05},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    plan = cli_json(stack, "submit", str(tmp_path / "spec.json"), "--dry-run")
    assert plan["fits"] is not False and plan["images"] > 0

    job = cli_json(stack, "submit", str(tmp_path / "spec.json"), "--wait")
    assert job["status"] == "succeeded", job["error"]
    job_id, model_id = job["id"], job["model_id"]
    assert job_id in [j["id"] for j in cli_json(stack, "jobs", "list", "--limit", "50")]
    assert cli_json(stack, "jobs", "get", job_id)["model_id"] == model_id
    lines = run_cli(stack, "jobs", "events", job_id, "--json").stdout.splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [e["seq"] for e in client.events(job_id, limit=1000)]
    followed = run_cli(stack, "jobs", "events", job_id, "--follow", "--after", "2")  # ends: the job has ended
    assert followed.returncode == 0 and len(followed.stdout.splitlines()) == len(lines) - 2
    assert {c["name"] for c in cli_json(stack, "jobs", "checkpoints", job_id)["data"]} == {
        "checkpoint.json",
        "checkpoint.safetensors",
    }

    assert model_id in [m["id"] for m in cli_json(stack, "models", "list")]
    assert cli_json(stack, "models", "get", model_id)["job_id"] == job_id
    # the client's types name the keys of the real answers (worker/api_types.py)
    shaped(client.job(job_id), views.Job)
    shaped(client.checkpoints(job_id), views.CheckpointList)
    model = client.model(model_id)
    shaped(model, views.Model)
    shaped(model["evaluation"], views.EvaluationSummary)
    evaluation = client.evaluation(model_id)
    shaped(evaluation, views.Evaluation)
    shaped(evaluation["per_class"][0], views.PerClass)
    exported = run_cli(stack, "models", "export", model_id, "--format", "adapter", "-o", str(tmp_path / "a.zip"))
    assert exported.returncode == 0 and (tmp_path / "a.zip").stat().st_size > 0 and "wrote" in exported.stdout
    images = sorted((digits / "holdout").glob("*/*.png"))[:2]
    predicted = cli_json(stack, "predict", model_id, *map(str, images))
    assert [p["label"] for p in predicted] == [p["label"] for p in client.predict(model_id, images)]
    shaped(client.predict(model_id, images)[0], views.Prediction)
    report = cli_json(stack, "report", model_id, "--out", str(tmp_path / "report"))
    assert report["evaluation"]["split"] in ("test", "val") and all(Path(p).is_file() for p in report["plots"])

    with zipfile.ZipFile(tmp_path / "two.zip", "w") as z:
        for label in ("0", "1"):
            for p in sorted((digits / "train" / label).glob("*.png"))[:4]:
                z.write(p, f"{label}/{p.name}")
    uploaded = cli_json(stack, "datasets", "upload", str(tmp_path / "two.zip"), "--name", "two")
    assert uploaded["num_images"] == 8 and uploaded["created_at"] > 0
    shaped(uploaded, views.Dataset)
    assert uploaded["id"] in [d["id"] for d in cli_json(stack, "datasets", "list")]
    assert cli_json(stack, "datasets", "get", uploaded["id"])["classes"] == ["0", "1"]
    assert run_cli(stack, "datasets", "delete", uploaded["id"]).stdout.strip() == f"deleted {uploaded['id']}"

    (tmp_path / "long.json").write_text(json.dumps({**spec, "training": {"epochs": 500, "batch_size": 4}}))
    queued = json.loads(run_cli(stack, "submit", str(tmp_path / "long.json"), "--json").stdout)
    cancelled = cli_json(stack, "jobs", "cancel", queued["id"])
    assert cancelled["cancel_requested"] is True
    assert client.wait(queued["id"], timeout_s=120)["status"] == "cancelled"
    assert run_cli(stack, "jobs", "delete", queued["id"]).returncode == 0
    assert run_cli(stack, "models", "delete", model_id).stdout.strip() == f"deleted {model_id}"
    gone = run_cli(stack, "models", "get", model_id)
    assert gone.returncode != 0 and "HTTP 404" in gone.stderr and model_id in gone.stderr


COMMANDS = [
    ["serve"],
    ["api"],
    ["inference"],
    ["worker"],
    ["params"],
    ["plan"],
    ["demo"],
    ["submit"],
    ["predict"],
    ["report"],
    *(["jobs", v] for v in ("list", "get", "cancel", "delete", "events", "checkpoints")),
    *(["models", v] for v in ("list", "get", "delete", "export", "register", "push")),
    *(["datasets", v] for v in ("upload", "list", "get", "delete")),
    ["cache", "list"],
    ["cache", "delete"],
    ["jobs"],
    ["models"],
    ["datasets"],
    ["cache"],
]
READS = {
    "list",
    "get",
    "cancel",
    "events",
    "checkpoints",
    "predict",
    "report",
    "submit",
    "upload",
    "jobs",
    "models",
    "datasets",
    "cache",
}


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_every_command_has_help_with_an_example(capsys):
    top = _help(capsys)
    assert "SIDETUNE_URL" in top and "SIDETUNE_API_KEY" in top and "examples:" in top
    listed = top.split("{", 1)[1].split("}", 1)[0].split(",")  # the commands the top-level help names
    assert sorted(listed) == sorted({c[0] for c in COMMANDS})
    for command in COMMANDS:
        text = _help(capsys, *command)
        assert "example:" in text or "examples:" in text, command
        assert ("--json" in text) == (command[-1] in READS or command == ["plan"]), command
        if command[0] in ("jobs", "models", "datasets", "submit", "predict", "report"):
            assert "SIDETUNE_URL" in text and "SIDETUNE_API_KEY" in text, command


def test_an_unreachable_server_is_one_line_naming_the_url(capsys) -> None:
    from worker.launcher import free_port

    url = f"http://127.0.0.1:{free_port()}"
    assert main(["jobs", "--url", url]) == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: cannot reach the sidetune API at {url}/"), err
    assert "Traceback" not in err


def test_a_refused_request_is_one_line_with_the_status_and_url(tmp_path, redis_url, capsys, monkeypatch) -> None:
    from api.main import create_app
    from storage.settings import Settings
    from tests.helpers import serve

    app = create_app(Settings(data_dir=tmp_path, redis_url=redis_url, api_keys=["k1"]))
    with serve(app) as url:
        monkeypatch.delenv("SIDETUNE_API_KEY", raising=False)
        assert main(["jobs", "--url", url]) == 4
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: HTTP 401 from {url}/jobs: a valid API key is required"), err
        assert err.endswith("(give a key with SIDETUNE_API_KEY)") and "\n" not in err, err
        monkeypatch.setenv("SIDETUNE_API_KEY", "k1")
        spec = tmp_path / "spec.json"
        spec.write_text(
            json.dumps(
                {"dataset": {"path": "/nowhere"}, "backbone": {"name": "resnet18"}, "method": {"name": "linear"}}
            )
        )
        assert main(["submit", str(spec), "--url", url]) == 4
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: HTTP 422 from {url}/jobs: backbone.name:") and "\n" not in err, err


def test_the_report_of_an_lbfgs_sweep_names_each_fits_l2_strength(settings, digits_root) -> None:
    """A linear-probe sweep over `pool` (2 configurations) fits each at every L2 strength of the grid: one row per
    fit with its strength, and the one fit the job kept marked."""
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter
    from services.spec import JobSpec
    from services.training.job import train_job
    from worker.commands.models import sweep_table

    job = JobSpec.model_validate(
        {
            "dataset": {"path": str(digits_root / "train")},
            "backbone": {"name": "test_vit", "pretrained": False},
            "method": {"name": "linear"},
            "sweep": {"pool": ["cls", "mean"], "weight_decay": [1e-4, 1e-2]},
        }
    )
    key = run_extraction(job, settings, NullReporter())["cache_key"]
    metrics = train_job(job, settings, key, NullReporter(), settings.data_path / "ckpt_report")["metrics"]
    title, columns, rows = sweep_table(metrics, multi_label=False)
    assert title == "sweep: 4 configurations" and columns[1] == "val_accuracy" and len(rows) == 4
    chosen = [r for r in rows if r[0].endswith(" (selected)")]
    assert len(chosen) == 1 and json.loads(chosen[0][0].removesuffix(" (selected)")) == {
        **metrics["selected"],
        "weight_decay": metrics["weight_decay"],
    }
    assert [float(r[1]) for r in rows] == sorted((float(r[1]) for r in rows), reverse=True)

    auto = job.model_copy(update={"sweep": job.sweep.model_copy(update={"weight_decay": None})})
    metrics = train_job(auto, settings, key, NullReporter(), settings.data_path / "ckpt_report2")["metrics"]
    title, _, rows = sweep_table(metrics, multi_label=False)
    assert title == f"sweep: 2 configurations, {len(rows)} fits over L2 strengths" and len(rows) > 2
    assert sum(r[0].endswith(" (selected)") for r in rows) == 1
    assert all('"weight_decay"' in r[0] for r in rows)
