"""The artifact store on a local directory and on a real S3-compatible server (moto): model folders written
atomically with a completion marker and read back whole, extra files of a model, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from storage.artifacts import ArtifactStore, Incomplete, read_tensors, write_tensors
from storage.store import MARKER, TMP_PREFIX


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "artifacts") if request.param == "local" else request.getfixturevalue("s3_url")


WEIGHTS = {
    "head.weight": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
    "head.bias": np.arange(3, dtype=np.float32),
    "readout.fc_norm_weight": np.zeros(0, np.float32),  # empty buffers (no fc_norm) must survive
}


def test_save_and_load_model_round_trip(root: str) -> None:
    store = ArtifactStore(root)
    config = {"classes": ["a", "b", "c"], "input_layers": [5], "method": {"name": "linear"}}
    metrics = {"val_accuracy": 0.75}
    store.save_model("model_x", WEIGHTS, config, metrics, files={"plots/loss.png": b"\x89PNG..."})
    assert store.has_model("model_x")
    loaded, loaded_config = store.load_model("model_x")
    assert loaded_config == config
    assert set(loaded) == set(WEIGHTS)
    for k, v in WEIGHTS.items():
        np.testing.assert_array_equal(loaded[k], v)
        assert loaded[k].dtype == v.dtype
    assert store.read_json("model_x", "metrics.json") == metrics
    assert store.read_file("model_x", "plots/loss.png") == b"\x89PNG..."
    assert store.list_files("model_x") == ["config.json", "metrics.json", "plots/loss.png", "weights.safetensors"]
    keys = store.root.fs.find(store.root.path)
    assert not [k for k in keys if TMP_PREFIX in k]  # no temporary keys left behind
    assert any(k.endswith(f"model_x/{MARKER}") for k in keys)


def test_a_model_without_its_marker_or_with_a_file_cut_short_is_incomplete(root: str) -> None:
    store = ArtifactStore(root)
    with pytest.raises(FileNotFoundError, match="model_none"):
        store.load_model("model_none")
    d = store.model("model_y")
    d.write_bytes("weights.safetensors", b"partial")  # a crash before the marker
    assert not store.has_model("model_y")
    with pytest.raises(Incomplete, match="no completion marker"):
        store.load_model("model_y")

    store.save_model("model_z", WEIGHTS, {"classes": []}, {})
    d = store.model("model_z")
    d.write_bytes("weights.safetensors", d.read_bytes("weights.safetensors")[:-8])  # replaced by a shorter object
    with pytest.raises(Incomplete, match=r"model_z is incomplete: weights.safetensors has \d+ bytes"):
        store.load_model("model_z")
    d.fs.rm_file(f"{d.path}/config.json")
    with pytest.raises(Incomplete, match="config.json is missing"):
        store.load_model("model_z")


def test_a_file_added_later_travels_with_the_model(root: str) -> None:
    store = ArtifactStore(root)
    store.save_model("model_e", WEIGHTS, {"classes": []}, {})
    store.write_file("model_e", "evaluation.json", b'{"test_accuracy": 0.9}')
    assert store.read_json("model_e", "evaluation.json") == {"test_accuracy": 0.9}
    store.load_model("model_e")  # the marker lists the new file too
    assert "evaluation.json" in store.model("model_e").check()["files"]


def test_checkpoints_and_their_removal(root: str) -> None:
    store = ArtifactStore(root)
    ckpt = store.checkpoints("job_1")
    ckpt.write_json("checkpoint.json", {"epoch": 1})
    assert ckpt.exists("checkpoint.json")
    store.drop_checkpoints("job_1")
    assert not ckpt.exists("checkpoint.json")
    store.drop_checkpoints("job_1")  # idempotent


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary_key(tmp_path: Path, monkeypatch) -> None:
    store = ArtifactStore(tmp_path)
    d = store.model("model_f")

    def broken_move(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(d.fs, "mv", broken_move)
    with pytest.raises(Exception, match="disk full"):
        d.write_bytes("config.json", b"{}")
    assert list((tmp_path / "models" / "model_f").iterdir()) == []


def test_scalars_stay_scalars(tmp_path: Path) -> None:
    # LoSA's per-layer scales are 0-d: a resumed optimizer broke when they came back with shape (1,)
    write_tensors(tmp_path / "t.safetensors", {"scale": np.array(0.5, np.float32)})
    assert read_tensors(tmp_path / "t.safetensors")["scale"].shape == ()
    store = ArtifactStore(tmp_path)
    store.save_model("model_s", {"scale": np.array(0.5, np.float32)}, {}, {})
    assert store.load_model("model_s")[0]["scale"].shape == ()
