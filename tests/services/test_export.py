"""Export (services/export/) against what the service predicts: every method's ONNX graph under onnxruntime (images
and video), the timm checkpoints of the methods that merge loaded by timm in a Python without sidetune, and adapters
rebuilt by `load_adapter`, each on the inputs the Predictor prepares and against its probabilities. The figures (max
abs differences) are written to test-artifacts/export_equality.json."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from services.export import ExportError, export_model
from services.export.adapter import load_adapter
from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from services.models.loading import load_trained, read_artifact
from services.models.manifest import Manifest
from services.paths import UserPaths
from services.serving.inference import Predictor
from services.serving.loaded import tensor_bytes
from services.spec import JobSpec
from services.training.job import train_job
from services.video.synthetic import write_motion
from storage.artifacts import ArtifactStore
from storage.settings import Settings
from tests.helpers import job_spec

# Besides the `trained` fixture's models (linear, LoSA, LoRA in tail mode): the other methods that merge, and two
# video models (a ViViT: LoSA's Eq. 6 side network from the cache, LoRA merged into it).
MORE = {
    "model_apla": ({"name": "apla", "rank": 4}, "images"),
    "model_arc": ({"name": "arc", "rank": 4}, "images"),
    "model_full": ({"name": "full"}, "images"),
}
VIDEO = {
    "model_video_losa": ({"name": "losa", "rank": 4}, "cache"),
    "model_video_lora": ({"name": "lora", "rank": 2}, "images"),
}
VIDEO_BACKBONE = {"name": "test_vit", "pretrained": False, "image_size": 32, "video": {"num_frames": 4, "tubelet": 2}}
ALL = ["model_linear", "model_losa_all", "model_lora", *MORE, *VIDEO]
MERGING = ["model_linear", "model_lora", *MORE]  # a plain timm ViT each (the linear probe: timm's own head)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export-videos")
    write_motion(root, per_class=3, frames=8, size=32)
    return root


@pytest.fixture(scope="module")
def served(trained: Settings, digits_root: Path, videos: Path) -> Settings:
    """The `trained` store with the models of MORE and VIDEO added, each trained for an epoch as the train step does."""
    settings = Settings(
        data_dir=trained.data_dir,
        redis_url=trained.redis_url,
        device="cpu",
        allowed_roots=[*trained.allowed_roots, videos],
    )
    artifacts = ArtifactStore.from_settings(settings)
    # at 64 px (a quarter of the cost of training through the backbone), which also exports a ViT built at another size
    specs = {m: job_spec(digits_root / "train", method, mode, image_size=64) for m, (method, mode) in MORE.items()}
    for model_id, (method, mode) in VIDEO.items():
        specs[model_id] = JobSpec.model_validate(
            {
                "dataset": {"path": str(videos / "train"), "val_fraction": 0.34},
                "backbone": VIDEO_BACKBONE,
                "method": method,
                "execution": {"mode": mode},
                "training": {"epochs": 1, "batch_size": 4},
            }
        )
    for model_id, spec in specs.items():
        key = run_extraction(spec, settings, NullReporter())["cache_key"] if spec.needs_cache else None
        out = train_job(spec, settings, key, NullReporter(), settings.data_path / "ckpt" / model_id)
        artifacts.save_model(model_id, out["weights"], out["manifest"], out["metrics"])
    return settings


@pytest.fixture(scope="module")
def service(served: Settings, images: list[bytes], videos: Path) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """Per model: the input batch the Predictor makes of the test inputs (ten digits, or four motion videos), and the
    probabilities it answers for them."""
    predictor, out = Predictor(served), {}
    clips = [p.read_bytes() for p in sorted((videos / "train").glob("*/*"))[:4]]
    for model_id in ALL:
        items = clips if model_id in VIDEO else images
        model = predictor.load(model_id)
        _, x = predictor.inputs(model, predictor.decode_for(model, items))
        probs = [[p["scores"][c] for c in model.classes] for p in predictor.predict(model_id, items)]
        out[model_id] = (x, np.array(probs))
    return out


@pytest.fixture(scope="module")
def figures(test_artifacts: Path):
    found: dict[str, dict[str, float]] = {}
    yield found
    path = test_artifacts / "export_equality.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**previous, **found}, indent=2, sort_keys=True))


def _torch_logits(served: Settings, model_id: str, x: torch.Tensor) -> np.ndarray:
    artifact = read_artifact(ArtifactStore.from_settings(served), model_id)
    with torch.inference_mode():
        return load_trained(artifact, UserPaths(served)).module(x).numpy()


def _manifest(served: Settings, model_id: str) -> Manifest:
    return Manifest.from_artifact(ArtifactStore.from_settings(served), model_id)


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(logits).softmax(-1).numpy()


@pytest.mark.parametrize("model_id", ALL)
def test_onnx_reproduces_torch_and_predict(model_id, served, service, figures, tmp_path) -> None:
    out = export_model(ArtifactStore.from_settings(served), served, model_id, "onnx", tmp_path)
    assert out.filename == f"{model_id}.onnx"
    x, probs = service[model_id]
    session = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("pixel_values", "logits") and inp.shape[1:] == list(x.shape[1:])
    got = session.run(None, {"pixel_values": x.numpy()})[0]
    one = session.run(None, {"pixel_values": x[:1].numpy()})[0]  # the batch is dynamic
    reference = _torch_logits(served, model_id, x)
    diff = float(np.abs(got - reference).max())
    assert diff <= 1e-4 and np.abs(one - reference[:1]).max() <= 1e-4
    np.testing.assert_allclose(_softmax(got), probs, atol=1e-5)  # predict's scores, rounded to 6 decimals
    meta = {p.key: p.value for p in onnx.load(str(out.path), load_external_data=False).metadata_props}
    manifest = _manifest(served, model_id)
    assert json.loads(meta["classes"]) == manifest.classes and meta["model_id"] == model_id
    assert json.loads(meta["preprocessing"]) == manifest.preprocessing.data_config()
    assert ("video" in meta) == (model_id in VIDEO)
    figures.setdefault(model_id, {})["onnx_vs_torch_logits"] = diff
    figures[model_id]["onnx_vs_predict_probs"] = float(np.abs(_softmax(got) - probs).max())


# Run with `python -I -S` (no PYTHONPATH, no site: the editable install of sidetune is not on the path) and only the
# environment's site-packages added: timm, torch and Pillow, no sidetune.
LOAD_WITH_TIMM_ALONE = """
import importlib.util, json, sys
sys.path.append(sys.argv[1])
assert all(importlib.util.find_spec(m) is None for m in ("services", "api", "worker", "storage")), "sidetune found"
import timm, torch
from PIL import Image
out = {}
for folder in sys.argv[3:]:
    config = json.load(open(f"{folder}/config.json"))
    c, args = config["num_classes"], {k: v for k, v in config["model_args"].items() if k == "img_size"}
    by_name = timm.create_model(config["architecture"], pretrained=True, num_classes=c, **args,
                                pretrained_cfg_overlay={"file": f"{folder}/model.safetensors", "num_classes": c})
    local = timm.create_model(f"local-dir:{folder}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=config["pretrained_cfg"]))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted(open(sys.argv[2]).read().split())])
    with torch.inference_mode():
        out[folder] = {"by_name": by_name.eval()(x).tolist(), "local_dir": local.eval()(x).tolist(),
                       "classes": config["label_names"]}
print(json.dumps(out))
"""


def test_timm_checkpoints_load_without_sidetune(served, service, images, figures, tmp_path) -> None:
    pngs = []
    for i, data in enumerate(images):
        pngs.append(tmp_path / f"{i:02d}.png")
        pngs[-1].write_bytes(data)
    (tmp_path / "images.txt").write_text("\n".join(map(str, pngs)))
    folders = {}
    for model_id in MERGING:
        out = export_model(ArtifactStore.from_settings(served), served, model_id, "timm", tmp_path)
        folders[model_id] = tmp_path / model_id
        with zipfile.ZipFile(out.path) as z:
            assert sorted(z.namelist()) == ["README.md", "config.json", "model.safetensors", "sidetune.json"]
            z.extractall(folders[model_id])
        out.path.unlink()
    site = sysconfig.get_paths()["purelib"]
    args = [site, str(tmp_path / "images.txt"), *map(str, folders.values())]
    run = subprocess.run(
        [sys.executable, "-I", "-S", "-c", LOAD_WITH_TIMM_ALONE, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout)
    for model_id, folder in folders.items():
        x, probs = service[model_id]
        reference = _torch_logits(served, model_id, x)
        got = loaded[str(folder)]
        assert got["classes"] == _manifest(served, model_id).classes
        for route in ("by_name", "local_dir"):
            logits = np.array(got[route], dtype=np.float32)
            diff = float(np.abs(logits - reference).max())
            assert diff <= 1e-5, (model_id, route, diff)  # timm's own preprocessing made the same input
            np.testing.assert_allclose(_softmax(logits), probs, atol=1e-5)
            figures.setdefault(model_id, {})[f"timm_{route}_vs_torch_logits"] = diff


@pytest.mark.parametrize(
    ("model_id", "cause"),
    [
        ("model_losa_all", "losa is a side network"),
        ("model_video_losa", "not a timm architecture"),
        ("model_video_lora", "not a timm architecture"),
    ],
)
def test_timm_refuses_what_no_timm_checkpoint_computes(model_id, cause, served, tmp_path) -> None:
    with pytest.raises(ExportError, match=cause):
        export_model(ArtifactStore.from_settings(served), served, model_id, "timm", tmp_path)


@pytest.mark.parametrize("model_id", ALL)
def test_adapter_rebuilds_the_model(model_id, served, service, figures, tmp_path) -> None:
    out = export_model(ArtifactStore.from_settings(served), served, model_id, "adapter", tmp_path)
    x, probs = service[model_id]
    model = load_adapter(out.path)
    with torch.inference_mode():
        logits = model(x).numpy()
    reference = _torch_logits(served, model_id, x)
    diff = float(np.abs(logits - reference).max())
    assert diff <= 1e-6 and model.classes == _manifest(served, model_id).classes
    np.testing.assert_allclose(_softmax(logits), probs, atol=1e-5)
    figures.setdefault(model_id, {})["adapter_vs_torch_logits"] = diff
    with zipfile.ZipFile(out.path) as z:
        weights = z.read("adapter_model.safetensors")  # what the method trained, not the backbone
        assert (len(weights) < 0.3 * tensor_bytes(model.module)) != (model_id == "model_full")
        z.extractall(tmp_path / "unzipped")
    assert isinstance(load_adapter(tmp_path / "unzipped"), torch.nn.Module)


def test_adapter_refuses_other_backbone_weights(served, tmp_path) -> None:
    import timm

    out = export_model(ArtifactStore.from_settings(served), served, "model_losa_all", "adapter", tmp_path)
    torch.manual_seed(123)
    other = timm.create_model("test_vit", pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match="other weights"):
        load_adapter(out.path, vit=other)
