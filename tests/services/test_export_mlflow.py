"""The `mlflow` export (services/export/mlflow_model.py): an MLflow model of a linear probe trained at 64 px (not
test_vit's own 160), unzipped and loaded by `mlflow.pyfunc.load_model` in a Python where sidetune cannot be imported,
answers predict's probabilities (max abs difference written to test-artifacts/export_mlflow.json) under its
signature (a base64 `image` column in, a column per class out), with its input example and the model card as
README.md; a side network is refused, naming the formats that take it."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from PIL import Image

from services.export import ExportError, export_model
from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from services.jobs.train import model_files
from services.serving.inference import Predictor
from services.training.job import train_job
from storage.artifacts import ArtifactStore
from storage.settings import Settings
from tests.helpers import job_spec

MODELS = {"model_linear64": {"name": "linear", "solver": "sgd"}, "model_losa64": {"name": "losa", "rank": 2}}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_url: str, digits_root: Path) -> Settings:
    """A store with MODELS, trained at 64 px and saved as the train step saves them."""
    data = tmp_path_factory.mktemp("export-mlflow")
    settings = Settings(data_dir=data, redis_url=redis_url, allowed_roots=[data, digits_root.parent], device="cpu")
    artifacts = ArtifactStore.from_settings(settings)
    for model_id, method in MODELS.items():
        spec = job_spec(digits_root / "train", method, "cache", image_size=64)
        key = run_extraction(spec, settings, NullReporter())["cache_key"]
        out = train_job(spec, settings, key, NullReporter(), data / "ckpt" / model_id)
        artifacts.save_model(model_id, out["weights"], out["manifest"], out["metrics"], model_files(out))
    return settings


# Run with `python -I -S` (no PYTHONPATH, no site: sidetune's editable install is not on the path), only the
# environment's site-packages added: mlflow, torch, timm, no sidetune. Prints the probabilities as JSON.
LOAD_WITH_MLFLOW_ALONE = """
import base64, importlib.util, json, sys
sys.path.append(sys.argv[1])
assert all(importlib.util.find_spec(m) is None for m in ("services", "api", "worker", "storage")), "sidetune found"
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[2])
images = [base64.b64encode(open(p, "rb").read()).decode() for p in sys.argv[3:]]
probs = model.predict(pd.DataFrame({"image": images}))
print(json.dumps({"columns": list(probs.columns), "probs": probs.to_numpy().tolist()}))
"""


def test_mlflow_export_loads_without_sidetune_and_gives_predicts_probabilities(
    served, images, test_artifacts, tmp_path
) -> None:
    model_id = "model_linear64"
    out = export_model(ArtifactStore.from_settings(served), served, model_id, "mlflow", tmp_path)
    assert out.filename == f"{model_id}-mlflow.zip" and out.media_type == "application/zip"
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(out.path) as z:
        z.extractall(folder)
    pngs = []
    for i, data in enumerate(images):
        pngs.append(tmp_path / f"{i:02d}.png")
        pngs[-1].write_bytes(data)
    site = sysconfig.get_paths()["purelib"]
    run = subprocess.run(
        [sys.executable, "-I", "-S", "-c", LOAD_WITH_MLFLOW_ALONE, site, str(folder), *map(str, pngs)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])

    predictor = Predictor(served)
    classes = predictor.load(model_id).classes
    answers = predictor.predict(model_id, images)
    expected = np.array([[a["scores"][c] for c in classes] for a in answers])  # rounded to 6 decimals
    assert loaded["columns"] == classes
    diff = float(np.abs(np.array(loaded["probs"]) - expected).max())
    (test_artifacts / "export_mlflow.json").write_text(json.dumps({"mlflow_pyfunc_vs_predict_probs": diff}))
    assert diff <= 1e-5, diff


def test_mlflow_export_has_its_signature_example_and_card(served, tmp_path) -> None:
    import mlflow
    from mlflow.models import Model

    model_id = "model_linear64"
    out = export_model(ArtifactStore.from_settings(served), served, model_id, "mlflow", tmp_path)
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(out.path) as z:
        z.extractall(folder)
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"MLmodel", "README.md", "requirements.txt", "input_example.json"} <= names
    timm = {"config.json", "model.safetensors", "sidetune.json"}
    assert {f"artifacts/timm/{f}" for f in timm} <= names
    requirements = (folder / "requirements.txt").read_text()
    assert all(f"{name}==" in requirements for name in ("torch", "timm", "mlflow")) and "sidetune" not in requirements

    meta = Model.load(str(folder))
    classes = json.loads(ArtifactStore.from_settings(served).read_file(model_id, "config.json"))["classes"]
    inputs, outputs = meta.signature.inputs.to_dict(), meta.signature.outputs.to_dict()
    assert inputs == [{"type": "string", "name": "image", "required": True}]
    assert [o["name"] for o in outputs] == classes and {o["type"] for o in outputs} == {"double"}
    example = meta.load_input_example(str(folder))
    with Image.open(io.BytesIO(base64.b64decode(example["image"][0]))) as im:
        assert im.size == (64, 64)  # the model's input size
    probs = mlflow.pyfunc.load_model(str(folder)).predict(example)
    assert list(probs.columns) == classes and abs(float(probs.sum(axis=1).iloc[0]) - 1) < 1e-6

    card = ModelCard((folder / "README.md").read_text())
    assert card.data.library_name == "mlflow" and card.data.model_name == model_id
    assert "mlflow.pyfunc.load_model" in card.text.split("## How to load it", 1)[1]


def test_mlflow_refuses_what_no_timm_checkpoint_computes(served, tmp_path) -> None:
    with pytest.raises(ExportError, match="losa is a side network.*export `onnx`.*an mlflow export wraps"):
        export_model(ArtifactStore.from_settings(served), served, "model_losa64", "mlflow", tmp_path)
