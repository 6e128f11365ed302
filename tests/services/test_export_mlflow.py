"""The `mlflow` export (services/export/mlflow_model.py): MLflow models of every kind the `onnx` export takes, images
trained at 64 px (not test_vit's own 160) and clips, unzipped and loaded by `mlflow.pyfunc.load_model` in a Python
where sidetune cannot be imported, answer predict's probabilities (max abs difference per model written to
test-artifacts/export_mlflow.json) under their signature (a base64 `image` or `video` column in, a column per class
out), with their input example, requirements and the model card as README.md: a linear probe read out by timm's head,
LoSA (a side network), a linear probe pooling otherwise than the backbone's head, and two ViViTs (LoSA, a strided
linear probe) fed mp4 and webm files. The video models' cards in every format that takes clips (`onnx`, `adapter`,
`mlflow`, `hf`): their code, run as written on those files, answers predict's probabilities too
(test-artifacts/export_cards_video.json)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest
from huggingface_hub import ModelCard
from PIL import Image

from services.export import Exported, refusal
from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from services.jobs.train import model_files
from services.models.manifest import Manifest
from services.serving.inference import Predictor
from services.spec import JobSpec
from services.training.job import train_job
from services.video.synthetic import write_motion
from storage.artifacts import ArtifactStore
from storage.settings import Settings
from tests.cards import blocks, exporter, start, unpack
from tests.helpers import job_spec

IMAGE_MODELS = {
    "model_linear64": {"name": "linear", "solver": "sgd"},  # timm's head computes it (pool auto: the class token)
    "model_losa64": {"name": "losa", "rank": 2},
    "model_linear_mean64": {"name": "linear", "solver": "sgd", "pool": "mean"},  # test_vit's head pools the token
}
VIDEO_MODELS = {
    "model_video_losa": ({"name": "losa", "rank": 2}, {"num_frames": 4, "tubelet": 2}),
    "model_video_linear": (
        {"name": "linear", "solver": "sgd"},
        {"num_frames": 4, "tubelet": 2, "sampling": "strided", "frame_stride": 2},
    ),
}
ALL = [*IMAGE_MODELS, *VIDEO_MODELS]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Motion clips (8 frames, 32 px) to train on (mp4), and four webm files (no frame count in their container)."""
    root = tmp_path_factory.mktemp("export-mlflow-videos")
    write_motion(root, per_class=3, frames=8, size=32)
    write_motion(root / "webm", per_class=1, frames=8, size=32, seed=1, suffix=".webm")
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_url: str, digits_root: Path, videos: Path) -> Settings:
    """A store with every model above, trained (images at 64 px) and saved as the train step saves them."""
    data = tmp_path_factory.mktemp("export-mlflow")
    roots = [data, digits_root.parent, videos]
    settings = Settings(data_dir=data, redis_url=redis_url, allowed_roots=roots, device="cpu")
    artifacts = ArtifactStore.from_settings(settings)
    specs = {m: job_spec(digits_root / "train", method, "cache", image_size=64) for m, method in IMAGE_MODELS.items()}
    for model_id, (method, video) in VIDEO_MODELS.items():
        specs[model_id] = JobSpec.model_validate(
            {
                "dataset": {"path": str(videos / "train"), "val_fraction": 0.34},
                "backbone": {"name": "test_vit", "pretrained": False, "image_size": 32, "video": video},
                "method": method,
                "execution": {"mode": "cache"},
                "training": {"epochs": 1, "batch_size": 4},
            }
        )
    for model_id, spec in specs.items():
        key = run_extraction(spec, settings, NullReporter())["cache_key"]
        out = train_job(spec, settings, key, NullReporter(), data / "ckpt" / model_id)
        artifacts.save_model(model_id, out["weights"], out["manifest"], out["metrics"], model_files(out))
    return settings


@pytest.fixture(scope="module")
def inputs(images: list[bytes], videos: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """The files each kind of model is fed: ten digits as PNGs; four mp4 and four webm clips."""
    folder = tmp_path_factory.mktemp("export-mlflow-inputs")
    pngs = []
    for i, data in enumerate(images):
        pngs.append(folder / f"{i:02d}.png")
        pngs[-1].write_bytes(data)
    clips = sorted((videos / "train").glob("*/*.mp4"))[::3] + sorted((videos / "webm" / "train").glob("*/*.webm"))
    return {"image": pngs, "video": clips}


@pytest.fixture(scope="module")
def figures(test_artifacts: Path):
    found: dict[str, float] = {}
    yield found
    path = test_artifacts / "export_mlflow.json"
    path.write_text(json.dumps({"mlflow_pyfunc_vs_predict_probs": found}, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def card_figures(test_artifacts: Path):
    found: dict[str, float] = {}
    yield found
    path = test_artifacts / "export_cards_video.json"
    path.write_text(json.dumps({"card_code_vs_predict_probs": found}, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def exported(served: Settings, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Exported]:
    return exporter(served, tmp_path_factory)


def _unzipped(exported: Callable[[str, str], Exported], model_id: str, tmp_path: Path) -> Path:
    out = exported(model_id, "mlflow")
    assert out.filename == f"{model_id}-mlflow.zip" and out.media_type == "application/zip"
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(out.path) as z:
        z.extractall(folder)
    return folder


# Run with `python -I -S` (no PYTHONPATH, no site: sidetune's editable install is not on the path), only the
# environment's site-packages added: mlflow, onnxruntime, timm, no sidetune. Prints the probabilities as JSON.
LOAD_WITH_MLFLOW_ALONE = """
import base64, importlib.util, json, sys
sys.path.append(sys.argv[1])
assert all(importlib.util.find_spec(m) is None for m in ("services", "api", "worker", "storage")), "sidetune found"
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[2])
files = [base64.b64encode(open(p, "rb").read()).decode() for p in sys.argv[4:]]
probs = model.predict(pd.DataFrame({sys.argv[3]: files}))
print(json.dumps({"columns": list(probs.columns), "probs": probs.to_numpy().tolist()}))
"""


@pytest.mark.parametrize("model_id", ALL)
def test_mlflow_export_loads_without_sidetune_and_gives_predicts_probabilities(
    model_id, served, exported, inputs, figures, tmp_path
) -> None:
    folder = _unzipped(exported, model_id, tmp_path)
    column = "video" if model_id in VIDEO_MODELS else "image"
    files = inputs[column]
    site = sysconfig.get_paths()["purelib"]
    run = subprocess.run(
        [sys.executable, "-I", "-S", "-c", LOAD_WITH_MLFLOW_ALONE, site, str(folder), column, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])

    predictor = Predictor(served)
    classes = predictor.load(model_id).classes
    answers = predictor.predict(model_id, [p.read_bytes() for p in files])
    expected = np.array([[a["scores"][c] for c in classes] for a in answers])  # rounded to 6 decimals
    assert loaded["columns"] == classes
    diff = float(np.abs(np.array(loaded["probs"]) - expected).max())
    figures[model_id] = diff
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("model_id", ["model_linear64", "model_video_losa"])
def test_mlflow_export_has_its_signature_example_and_card(model_id, served, exported, tmp_path) -> None:
    import mlflow
    from mlflow.models import Model

    folder = _unzipped(exported, model_id, tmp_path)
    video = model_id in VIDEO_MODELS
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"MLmodel", "README.md", "requirements.txt", "input_example.json"} <= names
    assert {"artifacts/onnx/model.onnx", "artifacts/onnx/model.onnx.data"} <= names  # the weights beside the graph
    requirements = (folder / "requirements.txt").read_text()
    pinned = ("onnxruntime", "torch", "timm", "mlflow", *(("av",) if video else ()))
    assert all(f"{name}==" in requirements for name in pinned) and "sidetune" not in requirements
    assert ("av==" in requirements) == video

    meta = Model.load(str(folder))
    classes = json.loads(ArtifactStore.from_settings(served).read_file(model_id, "config.json"))["classes"]
    column = "video" if video else "image"
    inputs, outputs = meta.signature.inputs.to_dict(), meta.signature.outputs.to_dict()
    assert inputs == [{"type": "string", "name": column, "required": True}]
    assert [o["name"] for o in outputs] == classes and {o["type"] for o in outputs} == {"double"}
    example = meta.load_input_example(str(folder))
    data = base64.b64decode(example[column][0])
    if video:
        with av.open(io.BytesIO(data)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 4 and frames[0].shape == (32, 32, 3)  # the clip's frames at the model's input size
    else:
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (64, 64)  # the model's input size
    probs = mlflow.pyfunc.load_model(str(folder)).predict(example)
    assert list(probs.columns) == classes and abs(float(probs.sum(axis=1).iloc[0]) - 1) < 1e-6

    card = ModelCard((folder / "README.md").read_text())
    assert card.data.library_name == "mlflow" and card.data.model_name == model_id
    usage = card.text.split("## How to load it", 1)[1]
    assert "mlflow.pyfunc.load_model" in usage and f'{{"{column}": ' in usage


# A video model's card in every format that takes clips; `onnx` (whose card samples clips itself) for both samplings
VIDEO_CARDS = [
    *(("model_video_losa", fmt) for fmt in ("onnx", "adapter", "mlflow", "hf")),
    ("model_video_linear", "onnx"),
]


def test_video_models_card_code_runs_as_written(served, exported, inputs, card_figures, tmp_path) -> None:
    """Each card's code, run as written in a fresh Python in the unpacked export (tests/cards.py), its placeholder
    line given mp4 and webm files, gives predict's probabilities: the clips read and sampled as predict does (`onnx`:
    PyAV in the card's own code, uniform and strided; `adapter`, `hf`: `AdapterModel.inputs`; `mlflow`: its pyfunc).
    The cards' runs at once: each is mostly imports."""
    clips = [str(p) for p in inputs["video"]]
    runs = {}
    for model_id, fmt in VIDEO_CARDS:
        code, *more = blocks(unpack(exported(model_id, fmt), folder := tmp_path / f"{model_id}-{fmt}"))
        assert not more and 'paths = ["clip.mp4"]' in code
        runs[model_id, fmt] = start(code, folder, clips)
    predicted = {}
    for (model_id, fmt), run in runs.items():
        if model_id not in predicted:
            predictor = Predictor(served)
            classes = predictor.load(model_id).classes
            answers = predictor.predict(model_id, [Path(p).read_bytes() for p in clips])
            predicted[model_id] = np.array([[a["scores"][c] for c in classes] for a in answers])  # 6 decimals
        diff = float(np.abs(run.result() - predicted[model_id]).max())
        card_figures[f"{fmt} {model_id}"] = diff
        assert diff <= 1e-5, (model_id, fmt, diff)


def test_mlflow_takes_every_model_onnx_takes(served) -> None:
    """It once wrapped the timm checkpoint and refused what timm refuses (LoSA, pooling other than the head's,
    ViViTs); it runs the ONNX graph now, which every model has (the issue asks predict's probabilities of every
    model). That these exports give them is the test above."""
    artifacts = ArtifactStore.from_settings(served)
    for model_id in ALL:
        manifest = Manifest.from_artifact(artifacts, model_id)
        assert refusal(manifest, "mlflow") is None and refusal(manifest, "onnx") is None
        assert (refusal(manifest, "timm") is None) == (model_id == "model_linear64")
