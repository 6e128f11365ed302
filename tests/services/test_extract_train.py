"""Extraction into the feature cache and training from it, end to end on CPU with a tiny random-init ViT."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services import methods
from services.data.datasets import DatasetError, read_imagefolder
from services.extraction import prepare, run_extraction
from services.jobs.progress import Cancelled, NullReporter
from services.methods.readout import FeatureInfo
from services.serving.inference import Predictor
from services.spec import JobSpec
from services.training.job import to_torch, train_job
from storage.artifacts import ArtifactStore
from storage.cache import CacheEntry, FeatureCache
from storage.settings import Settings

BATCH = 32
# test_vit: 6 blocks, dim 64, 160 px input, 101 tokens; pretrained=False (seeded init), so no download.
BACKBONE = {"name": "test_vit", "pretrained": False}


def job_spec(path: Path, method: dict | None = None, training: dict | None = None, **dataset) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"path": str(path), **dataset},
            "backbone": BACKBONE,
            "method": method or {"name": "losa", "rank": 4},
            "extraction": {"batch_size": BATCH},
            "training": {"epochs": 2, "batch_size": 32, **(training or {})},
        }
    )


def train(settings: Settings, spec: JobSpec, entry: CacheEntry, reporter, ckpt: Path, budget_mb: int = 512) -> dict:
    """Train from a cache entry as the train step does, with a feature memory budget of `budget_mb`."""
    return train_job(spec, settings.model_copy(update={"train_memory_mb": budget_mb}), entry.key, reporter, ckpt)


def entry_of(settings: Settings, result: dict) -> CacheEntry:
    return FeatureCache(settings.cache_dir).entry(result["cache_key"])


def n_batches(n: int) -> int:
    return -(-n // BATCH)


class CrashAfter(NullReporter):
    """A reporter whose k-th check_cancel (one per extracted batch) raises, like a killed worker."""

    def __init__(self, k: int, exc: Exception) -> None:
        super().__init__()
        self.k, self.exc, self.calls = k, exc, 0

    def check_cancel(self) -> None:
        self.calls += 1
        if self.calls >= self.k:
            raise self.exc


@pytest.fixture
def digits(digits_root: Path) -> Path:
    return digits_root / "train"


@pytest.fixture
def corrupt_digits(digits: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the digits with one undecodable .png in class 3; returns (root, corrupt file)."""
    root = tmp_path / "corrupt_ds"
    shutil.copytree(digits, root)
    bad = root / "3" / "9999_corrupt.png"
    bad.write_bytes(b"this is not a png")
    return root, bad


@pytest.mark.parametrize(
    ("method", "training", "min_accuracy"),
    [
        ({"name": "linear", "pool": "mean"}, {}, 0.35),  # L-BFGS; observed ~0.8
        ({"name": "losa", "rank": 4}, {"epochs": 15}, 0.5),  # observed ~0.82-0.90
    ],
    ids=["linear", "losa"],
)
def test_extract_then_train(
    settings: Settings, digits: Path, tmp_path: Path, method: dict, training: dict, min_accuracy: float
) -> None:
    spec = job_spec(digits, method, training)
    n = len(read_imagefolder(digits))
    result = run_extraction(spec, settings, NullReporter())
    assert result["cache_hit"] is False
    assert result["backbone_forwards"] == n_batches(n)
    assert result["images"] == n
    assert result["skipped"] == []
    entry = entry_of(settings, result)
    assert entry.is_complete
    # what the method reads: every layer and token for LoSA; the last block's pooled token for a linear probe
    assert entry.meta["shape"] == ([n, 1, 1, 64] if method["name"] == "linear" else [n, 6, 101, 64])
    assert entry.valid().all()
    assert entry.meta["classes"] == [str(i) for i in range(10)]

    out = train(settings, spec, entry, NullReporter(), tmp_path / "ckpt", 512)
    metrics = out["metrics"]
    assert metrics["train_images"] + metrics["val_images"] == n
    assert metrics["val_accuracy"] > min_accuracy  # chance is 0.1
    assert (metrics["side_params"] > 0) == (method["name"] == "losa")
    assert out["manifest"].classes == entry.meta["classes"]
    assert out["manifest"].input_layers == ([5] if method["name"] == "linear" else list(range(6)))
    # epochs are checkpointed; the linear probe's L-BFGS solve is one quick step, not checkpointed
    assert (tmp_path / "ckpt" / "checkpoint.json").exists() == (method["name"] == "losa")


def test_second_extraction_is_a_cache_hit(settings: Settings, digits: Path) -> None:
    spec = job_spec(digits)
    first = run_extraction(spec, settings, NullReporter())
    assert first["backbone_forwards"] > 0
    reporter = NullReporter()
    second = run_extraction(spec, settings, reporter)
    assert second["cache_hit"] is True
    assert second["backbone_forwards"] == 0
    assert second["cache_key"] == first["cache_key"]
    assert any("reusing the feature cache" in e["message"] for e in reporter.events)
    # another method or training setting on the same data and backbone reuses the same features
    other = job_spec(digits, {"name": "linear"}, {"epochs": 3})
    assert run_extraction(other, settings, NullReporter())["cache_key"] == first["cache_key"]


@pytest.mark.parametrize("exc", [Cancelled("job_x"), RuntimeError("worker killed")], ids=["cancelled", "crash"])
def test_interrupted_extraction_resumes(settings: Settings, digits: Path, exc: Exception) -> None:
    spec = job_spec(digits)
    n = len(read_imagefolder(digits))
    total = n_batches(n)
    with pytest.raises(type(exc)):
        run_extraction(spec, settings, CrashAfter(2, exc))
    entry = prepare(spec, settings).entry
    assert entry.exists and not entry.is_complete
    assert entry.pending_batches() == list(range(2, total))

    reporter = NullReporter()
    resumed = run_extraction(spec, settings, reporter)
    assert resumed["cache_hit"] is False
    assert resumed["backbone_forwards"] == total - 2
    assert any(f"2 of {total} batches already cached" in e["message"] for e in reporter.events)
    assert entry.is_complete

    clean_settings = Settings(data_dir=settings.data_dir / "clean", allowed_roots=settings.allowed_roots)
    clean = run_extraction(spec, clean_settings, NullReporter())
    assert clean["cache_key"] == resumed["cache_key"]
    assert clean["backbone_forwards"] == total
    clean_entry = entry_of(clean_settings, clean)
    np.testing.assert_array_equal(entry.read(), clean_entry.read())
    np.testing.assert_array_equal(entry.labels(), clean_entry.labels())
    assert entry.valid().all()


def test_corrupt_image_fails_naming_the_file(settings: Settings, corrupt_digits: tuple[Path, Path]) -> None:
    root, bad = corrupt_digits
    with pytest.raises(DatasetError, match="9999_corrupt.png") as err:
        run_extraction(job_spec(root, on_corrupt="fail"), settings, NullReporter())
    assert "not a readable image" in str(err.value)


def test_corrupt_image_is_skipped_and_counted(
    settings: Settings, corrupt_digits: tuple[Path, Path], tmp_path: Path
) -> None:
    root, bad = corrupt_digits
    dataset = read_imagefolder(root)
    n = len(dataset)
    spec = job_spec(root, on_corrupt="skip")
    reporter = NullReporter()
    result = run_extraction(spec, settings, reporter)
    assert result["backbone_forwards"] == n_batches(n)
    assert len(result["skipped"]) == 1
    assert "9999_corrupt.png" in result["skipped"][0]
    assert any(e["level"] == "warning" and "9999_corrupt.png" in e["message"] for e in reporter.events)
    entry = entry_of(settings, result)
    valid = entry.valid()
    assert int((~valid).sum()) == 1
    assert dataset.paths[int(np.flatnonzero(~valid)[0])].name == bad.name

    out = train(settings, spec, entry, NullReporter(), tmp_path / "ckpt", 512)
    assert out["metrics"]["train_images"] + out["metrics"]["val_images"] == n - 1
    strict = job_spec(root, on_corrupt="fail")  # same cache (on_corrupt is not part of the key)
    with pytest.raises(DatasetError, match="could not be decoded"):
        train(settings, strict, entry, NullReporter(), tmp_path / "ckpt2", 512)


def test_training_streams_features_when_over_the_memory_budget(
    settings: Settings, digits: Path, tmp_path: Path
) -> None:
    spec = job_spec(digits, {"name": "losa", "rank": 4, "layers": 2}, {"epochs": 2})
    entry = entry_of(settings, run_extraction(spec, settings, NullReporter()))
    in_memory = train(settings, spec, entry, NullReporter(), tmp_path / "a", 512)
    reporter = NullReporter()
    streamed = train(settings, spec, entry, reporter, tmp_path / "b", 0)
    assert any("streamed" in e["message"] for e in reporter.events)
    assert streamed["metrics"]["val_accuracy"] == in_memory["metrics"]["val_accuracy"]
    for k, v in in_memory["weights"].items():
        np.testing.assert_allclose(streamed["weights"][k], v, rtol=1e-5, atol=1e-6)


def png_bytes(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return buf.getvalue()


def test_predictor_round_trip(settings: Settings, digits: Path, tmp_path: Path) -> None:
    spec = job_spec(digits, {"name": "losa", "rank": 4}, {"epochs": 10})
    entry = entry_of(settings, run_extraction(spec, settings, NullReporter()))
    out = train(settings, spec, entry, NullReporter(), tmp_path / "ckpt", 512)
    artifacts = ArtifactStore.from_settings(settings)
    artifacts.save_model("model_losa", out["weights"], out["manifest"], out["metrics"])
    linear_spec = job_spec(digits, {"name": "linear"}, {"epochs": 2})
    lin = train(settings, linear_spec, entry, NullReporter(), tmp_path / "ckpt_lin", 512)
    artifacts.save_model("model_linear", lin["weights"], lin["manifest"], lin["metrics"])

    dataset = read_imagefolder(digits)
    indices = np.arange(0, len(dataset), len(dataset) // 10)[:10]  # spread over the classes
    images = [png_bytes(dataset.paths[i]) for i in indices]

    # the same module, applied to the cached (float16) activations of those images
    classes = out["manifest"].classes
    module = methods.build(spec.method, FeatureInfo.from_meta(entry.meta, entry.readout(), len(classes)))
    module.load_trainable(to_torch(out["weights"]))
    module.eval()
    with torch.inference_mode():
        probs = module(torch.from_numpy(entry.read(indices, out["manifest"].input_layers))).softmax(-1).numpy()

    predictor = Predictor(settings)
    preds = predictor.predict("model_losa", images)
    assert len(preds) == len(images)
    top2 = np.sort(probs, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 4e-3  # live float32 vs cached float16 features differ by ~1e-4 in prob
    assert clear.sum() >= 8
    for pred, p, is_clear in zip(preds, probs, clear, strict=True):
        assert list(pred["scores"]) == classes
        assert sum(pred["scores"].values()) == pytest.approx(1.0, abs=1e-4)
        np.testing.assert_allclose([pred["scores"][c] for c in classes], p, atol=2e-3)
        if is_clear:
            assert pred["label"] == classes[int(p.argmax())]
    assert predictor.load("model_losa") is predictor.load("model_losa")  # cached

    both = predictor.predict_many(["model_losa", "model_linear"], images[:3])
    assert set(both) == {"model_losa", "model_linear"}
    assert [p["label"] for p in both["model_losa"]] == [p["label"] for p in preds[:3]]
    assert len(both["model_linear"]) == 3
    with pytest.raises(DatasetError, match="uploaded image"):
        predictor.predict("model_losa", [b"not an image"])


def test_skipped_images_survive_a_resumed_extraction(settings: Settings, corrupt_digits: tuple[Path, Path]) -> None:
    root, bad = corrupt_digits
    spec = job_spec(root, on_corrupt="skip")
    with pytest.raises(Cancelled):
        run_extraction(spec, settings, CrashAfter(n_batches(len(read_imagefolder(root))) - 1, Cancelled("x")))
    result = run_extraction(spec, settings, NullReporter())
    assert result["skipped"] == [str(bad)]
    assert entry_of(settings, result).summary["skipped"] == [str(bad)]


def test_cached_activations_are_the_backbones_on_its_own_transform(settings: Settings, digits: Path) -> None:
    """The loader's split transform (PIL steps in its thread, ToTensor + Normalize batched in the model's) and the
    float16 stacking give exactly what the whole eval transform and a float32 forward give, rounded once."""
    from services.backbones import load_backbone
    from services.data.datasets import load_image

    spec = job_spec(digits, {"name": "losa", "rank": 4})
    entry = entry_of(settings, run_extraction(spec, settings, NullReporter()))
    backbone = load_backbone(spec.backbone)
    paths = read_imagefolder(digits).paths[:5]
    images = torch.stack([backbone.transform(load_image(p)) for p in paths])
    expected = backbone.intermediates(images, entry.layers).to(torch.float16).numpy()
    np.testing.assert_array_equal(entry.read(np.arange(5)), expected)
