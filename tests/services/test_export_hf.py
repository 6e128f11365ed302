"""`format=hf` (services/export/hf_folder.py): the folder `huggingface_hub.upload_folder` takes. A linear probe trained
at 64 px (not test_vit's own 160) gets timm's Hub layout, which `timm.create_model("local-dir:...", pretrained=True)`
loads at that size with predict's probabilities; a LoSA model gets the adapter layout, which `load_adapter` rebuilds
with predict's probabilities; both cards parse with `huggingface_hub.ModelCard.load`. `sidetune models push` where the
Hub does not answer (HF_ENDPOINT on a closed loopback port), or answers but no token is set, fails in one line before
exporting anything. (huggingface_hub ships no local Hub to push to, so the upload itself is not run here.) The max abs
differences of probabilities are written to test-artifacts/export_hf.json."""

from __future__ import annotations

import json
import os
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
from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from services.jobs.train import model_files
from services.serving.inference import Predictor
from services.training.job import train_job
from storage.artifacts import ArtifactStore
from storage.settings import Settings
from tests.helpers import job_spec
from worker.launcher import free_port

MODELS = {"model_linear64": {"name": "linear", "solver": "sgd"}, "model_losa64": {"name": "losa", "rank": 4}}
SIZE = 64


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


def _pictures(images: list[bytes], tmp_path: Path) -> list[Image.Image]:
    paths = []
    for i, data in enumerate(images):
        (p := tmp_path / f"{i:02d}.png").write_bytes(data)
        paths.append(p)
    return [Image.open(p).convert("RGB") for p in paths]


def test_a_plain_vit_gets_timms_hub_layout(served, images, figures, tmp_path) -> None:
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


def test_a_side_network_gets_the_adapter_layout(served, images, figures, tmp_path) -> None:
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


class _NotFound(BaseHTTPRequestHandler):
    """A server that answers every request 404: a Hub that is there."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _push(endpoint: str, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(home)}  # no token: none set, none saved
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "models", "push", "model_x", "me/digits", "--url", endpoint],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_push_says_in_one_line_where_the_hub_is_unreachable_or_no_token_is_set(tmp_path: Path) -> None:
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
