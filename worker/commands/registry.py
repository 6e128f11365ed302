"""Publishing a model where teams keep theirs: `sidetune models register MODEL_ID NAME`, into MLflow's model registry,
and `sidetune models push MODEL_ID REPO`, onto the Hugging Face Hub.

register: the model is exported through the API as `format=mlflow` (services/export/mlflow_model.py: a pyfunc model
with its signature, input example and model card), logged as the artifacts of a run in the tracking server
SIDETUNE_MLFLOW_TRACKING_URI names (tagged with the model's id), and registered from that run as a new version of NAME;
`mlflow.pyfunc.load_model("models:/NAME/N")` loads it. Needs the `mlflow` extra on this machine and in the inference
service (which writes the export); mlflow is imported by this verb only.

push: the model is exported through the API as `format=hf` (services/export/hf_folder.py: timm's Hub layout, or the
adapter's, with the model card), its card's loading code made to load from REPO (`hub_folder`), and uploaded by
`huggingface_hub.upload_folder` into the model repo REPO (created if missing), with the token huggingface_hub finds
(HF_TOKEN, or `hf auth login`'s) and its endpoint (HF_ENDPOINT). A Hub that does not answer is said in one line, before
anything is exported.
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
from worker.commands.common import CommandError, Subparsers, UsageError, client, verb

if TYPE_CHECKING:
    from huggingface_hub import HfApi
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


def push(args: argparse.Namespace) -> int:
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:  # the repo id goes into the card's code: checked before anything else
        validate_repo_id(args.repo)
    except HFValidationError as e:
        raise UsageError(f"{args.repo!r} is not a Hugging Face repo id (OWNER/NAME): {e}") from None
    api = HfApi()
    _check_hub(api.endpoint)
    if get_token() is None:  # huggingface_hub's own lookup: HF_TOKEN, then the token `hf auth login` saved
        raise CommandError(
            f"no Hugging Face token to push to {api.endpoint}: set HF_TOKEN or run `hf auth login` (a token with "
            "write access)"
        )
    with tempfile.TemporaryDirectory(prefix="sidetune-push-") as tmp:
        archive = client(args).export(args.model_id, "hf", Path(tmp) / "model-hf.zip")
        folder = hub_folder(archive, Path(tmp) / "model", args.repo)
        url = _upload(api, folder, args.model_id, args.repo, args.private)
    print(f"pushed {args.model_id} to {url}")
    return 0


def hub_folder(archive: Path, folder: Path, repo: str) -> Path:
    """The `hf` export `archive` unzipped into `folder` as it is uploaded to the Hub repo `repo`: its card's loading
    code made to load from that repo (services/export/hf_card.py), where the downloaded export's loads from itself."""
    from services.export.hf_card import name_repo  # huggingface_hub's card types: pushing only

    with zipfile.ZipFile(archive) as z:
        z.extractall(folder)
    name_repo(folder, repo)
    return folder


def _check_hub(endpoint: str) -> None:
    """The Hub must answer at all (any status): a refused connection or no route is said at once, in one line."""
    try:
        httpx.get(endpoint, timeout=REACH_TIMEOUT_S)
    except httpx.TransportError as e:
        raise CommandError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({type(e).__name__}: {e or 'no answer'}); this machine "
            "needs a network route to it (HF_ENDPOINT names another Hub)",
            unreachable=True,
        ) from None


def _upload(api: HfApi, folder: Path, model_id: str, repo: str, private: bool) -> str:
    """Create the model repo (kept if it exists) and upload `folder` as one commit; the commit's URL."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo, folder_path=folder, repo_type="model", commit_message=f"sidetune model {model_id}"
        )
    except HfHubHTTPError as e:
        raise CommandError(f"the Hugging Face Hub at {api.endpoint} refused the push to {repo}: {e}") from None
    except httpx.TransportError as e:
        raise CommandError(
            f"lost the Hugging Face Hub at {api.endpoint} while pushing ({type(e).__name__}: {e})", unreachable=True
        ) from None
    return info.commit_url


def add_parser(models: Subparsers) -> None:
    """`sidetune models register` and `sidetune models push` among the verbs of `sidetune models`."""
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
    p = verb(
        models,
        "push",
        "upload a model to the Hugging Face Hub (timm's layout where timm loads it, the adapter's otherwise; HF_TOKEN)",
        "HF_TOKEN=hf_... sidetune models push model_0194... my-org/digits-linear",
        push,
        reads=False,
    )
    p.add_argument("model_id")
    p.add_argument("repo", help="the model repo, OWNER/NAME: created if missing, the model added as a commit")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing one keeps its own)")
