"""`sidetune models register MODEL_ID NAME`: a model into MLflow's model registry. The model is exported through the
API as `format=mlflow` (services/export/mlflow_model.py: a pyfunc model with its signature, input example and model
card), logged as the artifacts of a run in the tracking server SIDETUNE_MLFLOW_TRACKING_URI names (tagged with the
model's id), and registered from that run as a new version of NAME; `mlflow.pyfunc.load_model("models:/NAME/N")` loads
it. Needs the `mlflow` extra on this machine and in the inference service (which writes the export); mlflow is
imported by this verb only.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from storage.settings import Settings
from worker.commands.common import CommandError, Subparsers, client, verb

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

RUN_TAG = "sidetune.model_id"  # on the run and on the model version: the sidetune model it came from
REACH_TIMEOUT_S = 10.0


def register(args: argparse.Namespace) -> int:
    uri = Settings().mlflow_tracking_uri
    if not uri:
        raise CommandError(
            "SIDETUNE_MLFLOW_TRACKING_URI is not set: name the MLflow tracking server whose registry takes the model "
            "(e.g. SIDETUNE_MLFLOW_TRACKING_URI=http://127.0.0.1:5000)"
        )
    if importlib.util.find_spec("mlflow") is None:  # the extra, checked before anything is downloaded
        raise CommandError("registering needs mlflow on this machine: pip install 'sidetune[mlflow]'")
    _check_reachable(uri)
    with tempfile.TemporaryDirectory(prefix="sidetune-register-") as tmp:
        archive = client(args).export(args.model_id, "mlflow", Path(tmp) / "model-mlflow.zip")
        folder = Path(tmp) / "model"
        with zipfile.ZipFile(archive) as z:
            z.extractall(folder)
        version = _register(uri, folder, args.model_id, args.name)
    print(
        f"registered {args.model_id} as {args.name!r} version {version.version}: models:/{args.name}/{version.version}"
    )
    return 0


def _check_reachable(uri: str) -> None:
    """A tracking server over HTTP must answer at all (any status): MLflow's client would retry a refused connection
    for minutes before saying so. Other URIs (a folder, a database) are MLflow's to open."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=REACH_TIMEOUT_S)
    except httpx.TransportError as e:
        raise CommandError(
            f"cannot reach the MLflow tracking server at {uri} ({type(e).__name__}: {e or 'no answer'}); is "
            "`mlflow server` running there? (SIDETUNE_MLFLOW_TRACKING_URI)",
            unreachable=True,
        ) from None


def _register(uri: str, folder: Path, model_id: str, name: str) -> ModelVersion:
    """Log `folder` (an MLflow model) as artifact `model` of a new run, then register it as a version of `name`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_name=f"register {model_id}", tags={RUN_TAG: model_id}) as run:
            mlflow.log_artifacts(str(folder), artifact_path="model")
        return mlflow.register_model(f"runs:/{run.info.run_id}/model", name, tags={RUN_TAG: model_id})
    except MlflowException as e:
        raise CommandError(f"the MLflow tracking server at {uri} refused the model: {e.message}") from None


def add_parser(models: Subparsers) -> None:
    """`sidetune models register` among the verbs of `sidetune models`."""
    p = verb(
        models,
        "register",
        "register a model in MLflow's model registry (SIDETUNE_MLFLOW_TRACKING_URI; the `mlflow` extra)",
        "SIDETUNE_MLFLOW_TRACKING_URI=http://127.0.0.1:5000 sidetune models register model_0194... digits",
        register,
        reads=False,
    )
    p.add_argument("model_id")
    p.add_argument("name", help="the registered model's name: a new version of it is created")
