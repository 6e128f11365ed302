"""`sidetune models register` (worker/commands/registry.py) against a real `mlflow server` on loopback (SQLite backend,
artifacts in a temporary folder) and the real stack: a linear probe trained at 64 px is exported as `format=mlflow`
through the API and registered; the registry's REST API answers the version (READY, tagged with the model's id, its
run tagged too), `mlflow.pyfunc.load_model("models:/NAME/1")` gives predict's probabilities, and a second register
makes version 2. Without SIDETUNE_MLFLOW_TRACKING_URI, or with nothing listening there, the command fails at once with
a line saying so."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from tests.mlflow_server import MlflowServer
from worker.launcher import free_port

NAME = "digits-linear"


@pytest.fixture(scope="module")
def tracking(mlflow_server: MlflowServer) -> str:
    """The session's tracking server (tests/conftest.py), whose registry these tests write to."""
    return mlflow_server.url


@pytest.fixture(scope="module")
def model_id(stack) -> str:
    running, client = stack
    spec = {
        "dataset": {"path": str(running.settings.data_path / "datasets" / "digits" / "train")},
        "backbone": {"name": "test_vit", "pretrained": False, "image_size": 64},
        "method": {"name": "linear", "solver": "sgd"},
        "training": {"epochs": 1, "lr": 0.05},
    }
    job = client.wait(client.submit(spec)["id"], timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    return job["model_id"]


def register(stack, *args: str, uri: str | None) -> subprocess.CompletedProcess:
    running, _ = stack
    env = {k: v for k, v in os.environ.items() if k != "SIDETUNE_MLFLOW_TRACKING_URI"}
    if uri is not None:
        env["SIDETUNE_MLFLOW_TRACKING_URI"] = uri
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "models", "register", *args, "--url", running.api_url],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_register_then_load_from_the_registry(stack, model_id, tracking, monkeypatch, test_artifacts) -> None:
    import mlflow

    done = register(stack, model_id, NAME, uri=tracking)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"models:/{NAME}/1" in done.stdout

    api = f"{tracking}/api/2.0/mlflow"
    version = httpx.get(f"{api}/model-versions/get", params={"name": NAME, "version": "1"}, timeout=30).json()
    version = version["model_version"]
    assert version["status"] == "READY" and {"key": "sidetune.model_id", "value": model_id} in version["tags"]
    run = httpx.get(f"{api}/runs/get", params={"run_id": version["run_id"]}, timeout=30).json()["run"]
    assert {"key": "sidetune.model_id", "value": model_id} in run["data"]["tags"]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    running, client = stack
    paths = sorted((running.settings.data_path / "datasets" / "digits" / "holdout").glob("*/*.png"))[:8]
    images = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in paths]})
    probs = model.predict(images)
    answers = client.predict(model_id, paths)
    classes = list(probs.columns)
    assert classes == client.model(model_id)["classes"]
    expected = np.array([[a["scores"][c] for c in classes] for a in answers])  # rounded to 6 decimals
    diff = float(np.abs(probs.to_numpy() - expected).max())
    (test_artifacts / "mlflow_registry.json").write_text(json.dumps({"registry_pyfunc_vs_predict_probs": diff}))
    assert diff <= 1e-5, diff

    again = register(stack, model_id, NAME, uri=tracking)
    assert again.returncode == 0 and f"models:/{NAME}/2" in again.stdout, again.stderr[-3000:]


def test_register_says_what_is_missing(stack, model_id, tmp_path: Path) -> None:
    unset = register(stack, model_id, NAME, uri=None)
    assert unset.returncode == 2 and "SIDETUNE_MLFLOW_TRACKING_URI is not set" in unset.stderr
    assert "Traceback" not in unset.stderr

    nobody = f"http://127.0.0.1:{free_port()}"
    down = register(stack, model_id, NAME, uri=nobody)
    assert down.returncode == 3 and f"cannot reach the MLflow tracking server at {nobody}" in down.stderr
    assert "Traceback" not in down.stderr
