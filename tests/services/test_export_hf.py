"""`format=hf` (services/export/hf_folder.py): the folder `huggingface_hub.upload_folder` takes. A linear probe trained
at 64 px (not test_vit's own 160) gets timm's Hub layout, which `timm.create_model("local-dir:...", pretrained=True)`
loads at that size with predict's probabilities; a LoSA model gets the adapter layout, which `load_adapter` rebuilds
with predict's probabilities; both cards parse with `huggingface_hub.ModelCard.load`, and their loading code, run as
written in the unzipped folder, gives predict's probabilities. The folder `sidetune models push` uploads
(services/export/hf_card.py's `name_repo`) has the repo in its card's code, which, run offline against
huggingface_hub's cache holding that repo, gives them too. `sidetune models push` where the Hub does not answer
(HF_ENDPOINT on a closed loopback port), answers but no token is set, or the repo is no repo id, fails in one line
before exporting anything. (huggingface_hub ships no local Hub to push to, so the upload itself is not run here.) The
max abs differences of probabilities are written to test-artifacts/export_hf.json."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image

from services.export import HUB_REPO_PLACEHOLDER, export_model
from services.export.adapter import load_adapter
from services.export.card import USAGE_HEADING
from services.export.hf_card import Layout, usage
from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from services.jobs.train import model_files
from services.serving.inference import Predictor
from services.training.job import train_job
from storage.artifacts import ArtifactStore
from storage.settings import Settings
from tests.helpers import job_spec
from worker.commands.registry import hub_folder
from worker.launcher import free_port

MODELS = {"model_linear64": {"name": "linear", "solver": "sgd"}, "model_losa64": {"name": "losa", "rank": 4}}
SIZE = 64
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_url: str, digits_root: Path) -> Settings:
    data = tmp_path_factory.mktemp("export-hf")
    settings = Settings(data_dir=data, redis_url=redis_url, allowed_roots=[data, digits_root.parent], device="cpu")
    artifacts = ArtifactStore.from_settings(settings)
    for model_id, method in MODELS.items():
        spec = job_spec(digits_root / "train", method, "cache", image_size=SIZE)
        key = run_extraction(spec, settings, NullReporter())["cache_key"]
        out = train_job(spec, settings, key, NullReporter(), data / "ckpt" / model_id)
        artifacts.save_model(model_id, out["weights"], out["manifest"], out["metrics"], model_files(out))
    return settings


@pytest.fixture(scope="module")
def figures(test_artifacts: Path):
    found: dict[str, float] = {}
    yield found
    (test_artifacts / "export_hf.json").write_text(json.dumps(found, indent=2, sort_keys=True))


def _unzipped(settings: Settings, model_id: str, tmp_path: Path) -> Path:
    exported = export_model(ArtifactStore.from_settings(settings), settings, model_id, "hf", tmp_path)
    assert exported.filename == f"{model_id}-hf.zip" and exported.media_type == "application/zip"
    folder = tmp_path / "repo"
    with zipfile.ZipFile(exported.path) as z:
        z.extractall(folder)
    return folder


def _predicted(settings: Settings, model_id: str, images: list[bytes]) -> tuple[np.ndarray, list[str]]:
    predictor = Predictor(settings)
    classes = predictor.load(model_id).classes
    answers = predictor.predict(model_id, images)
    return np.array([[a["scores"][c] for c in classes] for a in answers]), classes  # rounded to 6 decimals


def _paths(images: list[bytes], tmp_path: Path) -> list[str]:
    paths = []
    for i, data in enumerate(images):
        (p := tmp_path / f"{i:02d}.png").write_bytes(data)
        paths.append(str(p))
    return paths


def _pictures(images: list[bytes], tmp_path: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in _paths(images, tmp_path)]


def _card_code(card: Path) -> str:
    """The python block of the card's loading section."""
    (block,) = re.findall(r"```python\n(.*?)```", card.read_text().split(USAGE_HEADING, 1)[1], flags=re.S)
    return block


def _run_card(folder: Path, paths: list[str], monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """The card's code run as written, in the unzipped folder, `paths` the images; its `probs`."""
    monkeypatch.chdir(folder)
    namespace: dict = {"paths": paths}
    exec(compile(_card_code(folder / "README.md"), "README.md", "exec"), namespace)
    return np.asarray(namespace["probs"], dtype=np.float64)


def test_a_plain_vit_gets_timms_hub_layout(served, images, figures, tmp_path, monkeypatch) -> None:
    model_id = "model_linear64"
    folder = _unzipped(served, model_id, tmp_path)
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    expected, classes = _predicted(served, model_id, images)
    assert config["architecture"] == "test_vit" and config["num_classes"] == len(classes)
    assert config["label_names"] == classes and config["model_args"]["img_size"] == [SIZE, SIZE]
    assert list(config["pretrained_cfg"]["input_size"]) == [3, SIZE, SIZE]

    card = ModelCard.load(folder / "README.md")  # huggingface_hub's own reader, as the Hub parses it
    assert card.data.library_name == "timm" and card.data.model_name == model_id and "linear" in card.data.tags
    assert f'timm.create_model("hf-hub:{HUB_REPO_PLACEHOLDER}", pretrained=True)' in card.text

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert model.patch_embed.img_size == (SIZE, SIZE)  # built at the size it was trained at, not test_vit's 160
    transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=config["pretrained_cfg"]))
    with torch.inference_mode():
        probs = model(torch.stack([transform(im) for im in _pictures(images, tmp_path)])).softmax(-1).numpy()
    diff = float(np.abs(probs - expected).max())
    figures["hf_timm_local_dir_vs_predict_probs"] = diff
    assert diff <= 1e-5, diff

    diff = float(np.abs(_run_card(folder, _paths(images, tmp_path), monkeypatch) - expected).max())
    figures["hf_timm_card_code_vs_predict_probs"] = diff
    assert diff <= 1e-5, diff


def test_a_side_network_gets_the_adapter_layout(served, images, figures, tmp_path, monkeypatch) -> None:
    model_id = "model_losa64"
    folder = _unzipped(served, model_id, tmp_path)
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "sidetune" and "losa" in card.data.tags
    assert f'load_adapter(snapshot_download("{HUB_REPO_PLACEHOLDER}"))' in card.text

    expected, classes = _predicted(served, model_id, images)
    model = load_adapter(folder)
    assert model.classes == classes
    with torch.inference_mode():
        probs = model(torch.stack([model.transform(im) for im in _pictures(images, tmp_path)])).softmax(-1).numpy()
    diff = float(np.abs(probs - expected).max())
    figures["hf_adapter_vs_predict_probs"] = diff
    assert diff <= 1e-5, diff

    diff = float(np.abs(_run_card(folder, _paths(images, tmp_path), monkeypatch) - expected).max())
    figures["hf_adapter_card_code_vs_predict_probs"] = diff
    assert diff <= 1e-5, diff


def _hub_cache(folder: Path, repo: str, cache: Path) -> None:
    """`folder` in huggingface_hub's cache as a download of `repo` would leave it (its documented layout: refs/main
    naming a commit, the files under snapshots/<commit>/), so that the Hub's form of the code runs offline."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(folder, root / "snapshots" / commit)


def _run_from_hub(folder: Path, repo: str, paths: list[str], tmp_path: Path) -> np.ndarray:
    """The card's code of `folder`, pushed to `repo`, run as written in a fresh Python where huggingface_hub finds
    the repo in its cache, offline; its `probs`."""
    cache = tmp_path / "hub-cache"
    _hub_cache(folder, repo, cache)
    (script := tmp_path / "card.py").write_text(_card_code(folder / "README.md"))
    run = "import json, sys; paths = json.loads(sys.argv[2]); exec(open(sys.argv[1]).read()); "
    run += "print(json.dumps(probs.tolist()))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    env["PYTHONPATH"] = str(ROOT)  # the adapter layout's code imports sidetune's load_adapter
    out = subprocess.run(
        [sys.executable, "-c", run, str(script), json.dumps(paths)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    return np.array(json.loads(out.stdout))


@pytest.mark.parametrize("model_id", MODELS)
def test_a_pushed_folders_card_loads_from_its_repo(model_id, served, images, figures, tmp_path) -> None:
    """What `sidetune models push` uploads (`hub_folder`): the card's loading code names the repo (and the placeholder
    is gone), the rest of the card as downloaded; that code, run as written in a fresh Python where huggingface_hub
    finds the repo in its cache (HF_HUB_OFFLINE=1: no Hub here), gives predict's probabilities."""
    repo = "me/digits-hf"
    exported = export_model(ArtifactStore.from_settings(served), served, model_id, "hf", tmp_path)
    with zipfile.ZipFile(exported.path) as z:
        z.extractall(downloaded := tmp_path / "download")
    folder = hub_folder(exported.path, tmp_path / "pushed", repo)
    card, before = (folder / "README.md").read_text(), (downloaded / "README.md").read_text()
    assert card.split(USAGE_HEADING)[0] == before.split(USAGE_HEADING)[0]  # front matter, figures, classes
    assert HUB_REPO_PLACEHOLDER not in card and HUB_REPO_PLACEHOLDER in before
    code = _card_code(folder / "README.md")
    if MODELS[model_id]["name"] == "linear":
        assert f'timm.create_model("hf-hub:{repo}", pretrained=True)' in code
        assert f'hf_hub_download("{repo}", "config.json")' in code
    else:
        assert f'load_adapter(snapshot_download("{repo}"))' in code
    assert (
        ModelCard.load(folder / "README.md").data.to_dict() == ModelCard.load(downloaded / "README.md").data.to_dict()
    )
    # the downloaded card's section is what the folder's files make again: pushing rewrites only the repo
    assert before.endswith(f"{USAGE_HEADING}\n\n{usage(Layout.read(downloaded))}\n")

    probs = _run_from_hub(folder, repo, _paths(images, tmp_path), tmp_path)
    expected, _ = _predicted(served, model_id, images)
    diff = float(np.abs(probs - expected).max())
    figures[f"hf_pushed_card_code_{MODELS[model_id]['name']}_vs_predict_probs"] = diff
    assert diff <= 1e-5, diff


class _NotFound(BaseHTTPRequestHandler):
    """A server that answers every request 404: a Hub that is there."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _push(endpoint: str, home: Path, repo: str = "me/digits") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(home)}  # no token: none set, none saved
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "models", "push", "model_x", repo, "--url", endpoint],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_push_says_in_one_line_where_the_hub_is_unreachable_no_token_is_set_or_the_repo_is_no_repo_id(
    tmp_path: Path,
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    down = _push(closed, tmp_path)
    assert down.returncode == 3, down.stderr
    assert down.stderr.strip().splitlines() == [down.stderr.strip()]  # one line, no traceback
    assert f"cannot reach the Hugging Face Hub at {closed}" in down.stderr

    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        untokened = _push(f"http://127.0.0.1:{server.server_port}", tmp_path)
    finally:
        server.shutdown()
    assert untokened.returncode == 2 and "no Hugging Face token" in untokened.stderr, untokened.stderr
    assert "HF_TOKEN" in untokened.stderr and "Traceback" not in untokened.stderr

    named = _push(closed, tmp_path, repo='me/digits")\nimport os')  # the repo goes into the card's code
    assert named.returncode == 2 and "is not a Hugging Face repo id" in named.stderr, named.stderr
