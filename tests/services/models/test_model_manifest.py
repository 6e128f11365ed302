"""A trained model's manifest (services/models/manifest.py) and its one loader (services/models/loading.py): the
manifest round-trips through its JSON; an artifact written before manifests (version 1: a plain `config` dict) is
migrated when read, and loads and predicts as the same model written today; every loader (serving, export, adapters)
refuses other backbone weights with the one error, `BackboneChanged`."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter

from services.export import export_model
from services.export.adapter import load_adapter
from services.models.loading import load_trained, read_artifact
from services.models.manifest import VERSION, BackboneChanged, Manifest, migrate
from services.paths import UserPaths
from services.serving.inference import Predictor
from storage.artifacts import ArtifactStore
from storage.manifests import ManifestRecord, ManifestV1Record
from storage.settings import Settings

BACKBONE = {
    "checkpoint": None,
    "image_size": None,
    "init_seed": 0,
    "name": "test_vit",
    "precision": "auto",
    "pretrained": False,
    "video": None,
}
DATA_CONFIG = {
    "crop_mode": "center",
    "crop_pct": 0.95,
    "input_size": [3, 160, 160],
    "interpolation": "bicubic",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
}
HYPERPARAMETERS = {
    "batch_size": 32,
    "class_weights": "none",
    "clip_grad_norm": None,
    "compile": False,
    "early_termination": False,
    "epochs": 1,
    "label_smoothing": 0.0,
    "lr": 0.01,
    "optimizer": "adamw",
    "seed": 0,
    "warmup_epochs": 1.0,
    "weight_decay": 0.0001,
}
CLASSES = [str(i) for i in range(10)]
HASH = "45917adc7fb743ea21193df1fe0328c6"  # test_vit's seeded initialisation, as the run below hashed it


def v1_config(model: str, tokens: str = "all") -> dict[str, Any]:
    """`config.json` as services/training/job.py wrote it before manifests: captured from `train_job` on the digits
    (tests.helpers.job_spec) for tests.helpers.MODELS' `model_linear` (cache mode) and `model_lora` (tail mode). The
    probe's cache entry holds every token where it reuses LoSA's (the `trained` fixture), else the class token alone
    (`tokens="cls"`, extracted for it)."""
    side = model == "model_linear"
    pooled = side and tokens != "all"
    return {
        "backbone": dict(BACKBONE),
        "cache_key": "117713cd2a04c33928c5850d113b632a/"
        + ("f4a4fd22ff56e52968b3a011cc74f76b" if side else "cf32109752188e65ec49c657e545247f"),
        "classes": list(CLASSES),
        "data_config": dict(DATA_CONFIG),
        "feature_info": {
            "dim": 64,
            "global_pool": "token",
            "norm_eps": 1e-06,
            "num_classes": 10,
            "num_layers": 6,
            "num_prefix_tokens": 1,
            "temporal": None,
            "token_mode": tokens if side else "all",
            "tokens": 1 if pooled else 101,
        },
        "hyperparameters": dict(HYPERPARAMETERS),
        "input_layers": [5] if side else None,
        "input_tokens": tokens if side else None,
        "kind": "side" if side else "adapted",
        "method": (
            {"cv_folds": 5, "cv_max_images": 50000, "max_iter": 1000, "name": "linear", "pool": "auto", "solver": "sgd"}
            if side
            else {"alpha": 8.0, "dropout": 0.1, "name": "lora", "rank": 4, "targets": ["qkv", "proj", "fc1", "fc2"]}
        ),
        "mode": "cache" if side else "tail",
        "multi_label": False,
        "tail_blocks": None if side else 2,
        "threshold": None,
        "weights_hash": HASH,
    }


# ---- the manifest alone (no torch) -----------------------------------------------------------------------------
def test_a_version_1_config_migrates_field_by_field() -> None:
    side, adapted = migrate(v1_config("model_linear", tokens="cls")), migrate(v1_config("model_lora"))
    assert side.version == adapted.version == VERSION
    assert (side.kind, side.mode, side.input_layers, side.input_tokens) == ("side", "cache", [5], "cls")
    assert side.method.name == "linear" and side.method.solver == "sgd"
    assert side.features.tokens == 1 and side.features.token_mode == "cls" and side.features.dim == 64
    assert side.preprocessing.data_config() == DATA_CONFIG and side.preprocessing.input_size == (3, 160, 160)
    assert side.backbone.name == "test_vit" and side.video is None and side.weights_hash == HASH
    assert side.input_shape == (3, 160, 160) and side.classes == CLASSES and side.hyperparameters == HYPERPARAMETERS
    assert (adapted.kind, adapted.tail_blocks, adapted.input_layers, adapted.input_tokens) == ("adapted", 2, None, None)
    assert adapted.method.rank == 4 and adapted.features.tokens == 101


def test_the_manifest_round_trips_through_its_json() -> None:
    for model in ("model_linear", "model_lora"):
        manifest = migrate(v1_config(model))
        stored = json.loads(json.dumps(manifest.to_dict()))
        assert stored["version"] == VERSION and "data_config" not in stored and "feature_info" not in stored
        assert migrate(stored) == manifest == Manifest.model_validate_json(manifest.model_dump_json())


def test_each_version_of_the_config_is_its_typed_record_storage_names() -> None:
    """storage/manifests.py: a version 1 config and a version 2 one (`to_dict`) validate unchanged as their records."""
    for model in ("model_linear", "model_lora"):
        old = v1_config(model)
        assert TypeAdapter(ManifestV1Record).validate_python(old) == old
        new = migrate(old).to_dict()
        assert TypeAdapter(ManifestRecord).validate_python(new) == new


def test_the_oldest_configs_get_the_defaults_their_readers_applied() -> None:
    old = v1_config("model_linear")
    for key in ("kind", "multi_label", "threshold", "input_tokens", "hyperparameters", "cache_key"):
        del old[key]
    manifest = migrate(old)
    assert (manifest.kind, manifest.multi_label, manifest.threshold) == ("side", False, None)
    assert manifest.input_tokens == "all" and manifest.hyperparameters == {} and manifest.cache_key is None


def test_what_no_manifest_can_say_is_refused() -> None:
    with pytest.raises(ValueError, match="version 3"):
        migrate({**migrate(v1_config("model_linear")).to_dict(), "version": 3})
    with pytest.raises(ValueError, match="kind"):
        migrate({**v1_config("model_linear"), "kind": "adapted"})  # a linear probe is a side network
    with pytest.raises(ValueError, match="input_layers"):
        migrate({**v1_config("model_linear"), "input_layers": None})


# ---- artifacts of both versions through the one loader ---------------------------------------------------------
def _as_v1(settings: Settings, model_id: str) -> str:
    """A copy of `model_id` whose config.json is the version-1 dict that the code before manifests wrote for it."""
    artifacts = ArtifactStore.from_settings(settings)
    new = read_artifact(artifacts, model_id)
    old = v1_config(model_id)
    old["weights_hash"] = new.manifest.weights_hash  # the captured HASH, unless timm initialises test_vit otherwise
    artifacts.save_model(f"{model_id}_v1", new.weights, old, {})
    return f"{model_id}_v1"


@pytest.mark.parametrize("model_id", ["model_linear", "model_lora"])
def test_an_old_artifact_loads_and_predicts_as_a_new_one(model_id: str, trained: Settings, images: list[bytes]) -> None:
    old_id = _as_v1(trained, model_id)
    artifacts = ArtifactStore.from_settings(trained)
    raw = json.loads(artifacts.read_file(old_id, "config.json"))
    assert "version" not in raw and "data_config" in raw  # stored as the old code wrote it; migrated when read
    new, old = read_artifact(artifacts, model_id), read_artifact(artifacts, old_id)
    assert old.manifest.model_dump(exclude={"cache_key"}) == new.manifest.model_dump(exclude={"cache_key"})

    predictor = Predictor(trained)
    _, x = predictor.prepare(model_id, images)
    with torch.inference_mode():
        logits = [load_trained(a, UserPaths(trained)).module(x).numpy() for a in (new, old)]
    np.testing.assert_array_equal(logits[0], logits[1])
    served_new, served_old = predictor.predict(model_id, images), predictor.predict(old_id, images)
    assert served_old == served_new and len(served_new) == len(images)


def test_every_loader_refuses_other_backbone_weights_with_one_error(
    trained: Settings, images: list[bytes], tmp_path: Path
) -> None:
    artifacts = ArtifactStore.from_settings(trained)
    new = read_artifact(artifacts, "model_losa_all")
    tampered = new.manifest.model_copy(update={"weights_hash": "0" * 32})
    artifacts.save_model("model_tampered", new.weights, tampered, {})
    with pytest.raises(BackboneChanged, match="other weights"):
        Predictor(trained).predict("model_tampered", images[:1])
    for fmt in ("onnx", "adapter"):
        with pytest.raises(BackboneChanged, match="other weights"):
            export_model(artifacts, trained, "model_tampered", fmt, tmp_path)
    assert BackboneChanged.status == 409  # the caller's answer (services/errors.py), not an internal error


def test_an_adapter_of_format_1_still_loads(trained: Settings, images: list[bytes], tmp_path: Path) -> None:
    """adapter_config.json of format 1 held the artifact config's keys flat, its data_config as `preprocessing`."""
    artifacts = ArtifactStore.from_settings(trained)
    out = export_model(artifacts, trained, "model_linear", "adapter", tmp_path)
    old = {
        k: v for k, v in v1_config("model_linear").items() if k not in ("data_config", "hyperparameters", "cache_key")
    }
    old |= {"format": "sidetune-adapter", "format_version": 1, "model_id": "model_linear"}
    old |= {
        "preprocessing": DATA_CONFIG,
        "weights_hash": read_artifact(artifacts, "model_linear").manifest.weights_hash,
    }
    folder = tmp_path / "format1"
    with zipfile.ZipFile(out.path) as z:
        z.extractall(folder)
    (folder / "adapter_config.json").write_text(json.dumps(old))
    _, x = Predictor(trained).prepare("model_linear", images)
    with torch.inference_mode():
        np.testing.assert_array_equal(load_adapter(folder)(x).numpy(), load_adapter(out.path)(x).numpy())
