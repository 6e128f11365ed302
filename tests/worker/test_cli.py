"""The `sidetune` CLI against the running stack: submit --wait, jobs, predict; and `params`, offline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from worker.cli import main


def run_cli(stack, *args: str) -> subprocess.CompletedProcess:
    running, _ = stack
    return subprocess.run([sys.executable, "-m", "worker.cli", *args, "--url", running.api_url],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_submit_wait_then_jobs_and_predict(stack, tmp_path):
    running, _ = stack
    digits = running.settings.data_path / "datasets" / "digits"
    spec = {"name": "cli", "dataset": {"path": str(digits / "train")}, "method": {"name": "linear"},
            "backbone": {"name": "test_vit", "pretrained": False}, "training": {"epochs": 2}}  # fmt: skip
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
    (tmp_path / "bad.json").write_text(json.dumps({"dataset": {"path": "/etc"}, "backbone": {"name": "test_vit"},
                                                   "method": {"name": "linear"}}))  # fmt: skip
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
        spec.write_text(json.dumps({"dataset": {"path": "/nowhere"}, "backbone": {"name": "resnet18"},
                                    "method": {"name": "linear"}}))  # fmt: skip
        assert main(["submit", str(spec), "--url", url]) == 4
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: HTTP 422 from {url}/jobs: backbone.name:") and "\n" not in err, err
