"""The artifact store: model folders (weights, config, metrics) written atomically and read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from storage.artifacts import ArtifactStore, read_json, read_tensors, write_json, write_tensors


def test_save_and_load_model_round_trip(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    weights = {
        "head.weight": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
        "head.bias": np.arange(3, dtype=np.float32),
        "readout.fc_norm_weight": np.zeros(0, np.float32),  # empty buffers (no fc_norm) must survive
    }
    config = {"classes": ["a", "b", "c"], "input_layers": [5], "method": {"name": "linear"}}
    metrics = {"val_accuracy": 0.75}
    d = store.save_model("model_x", weights, config, metrics)
    assert d == tmp_path / "models" / "model_x"
    assert store.has_model("model_x")
    loaded, loaded_config = store.load_model("model_x")
    assert loaded_config == config
    assert set(loaded) == set(weights)
    for k, v in weights.items():
        np.testing.assert_array_equal(loaded[k], v)
        assert loaded[k].dtype == v.dtype
    assert read_json(d / "metrics.json") == metrics
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_has_model_false_until_config_written(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    assert not store.has_model("model_y")
    d = store.model_dir("model_y")
    d.mkdir(parents=True)
    (d / "weights.safetensors").write_bytes(b"partial")  # a crash before config.json
    assert not store.has_model("model_y")
    write_json(d / "config.json", {"classes": []})
    assert store.has_model("model_y")


def test_drop_checkpoints(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    ckpt = store.checkpoint_dir("job_1")
    write_json(ckpt / "checkpoint.json", {"epoch": 1})
    assert ckpt.exists()
    store.drop_checkpoints("job_1")
    assert not ckpt.exists()
    store.drop_checkpoints("job_1")  # idempotent


def test_scalars_stay_scalars(tmp_path: Path) -> None:
    # LoSA's per-layer scales are 0-d: a resumed optimizer broke when they came back with shape (1,)
    write_tensors(tmp_path / "t.safetensors", {"scale": np.array(0.5, np.float32)})
    assert read_tensors(tmp_path / "t.safetensors")["scale"].shape == ()
