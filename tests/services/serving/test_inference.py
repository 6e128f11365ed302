"""Serving (services/serving/inference.py) with real models on test_vit: a merged model shares every tensor it did not
change with its backbone and predicts what a whole merged copy predicts; loaded weights stay under a budget in bytes
(least recently used out, a backbone with its last model); concurrent loads of one model load it once; an incomplete
artifact is never loaded; the serving dtype (bfloat16 exercised on the CPU, where CUDA would use it)."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from services import methods
from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from services.models.loading import read_artifact
from services.serving.inference import Predictor
from services.serving.loaded import serving_dtype, tensor_bytes
from services.training.job import train_job
from storage.artifacts import ArtifactStore, Incomplete
from storage.settings import Settings
from tests.helpers import job_spec


def test_serving_dtype() -> None:
    assert serving_dtype("cuda") == serving_dtype("cuda:1") == torch.bfloat16
    assert serving_dtype("cpu") == torch.float32
    assert serving_dtype("cuda", "fp32") == torch.float32 and serving_dtype("cpu", "bf16") == torch.bfloat16


def test_a_merged_model_shares_what_it_did_not_change(trained: Settings, images: list[bytes]) -> None:
    predictor = Predictor(trained)
    lora = predictor.load("model_lora")  # LoRA on the last 2 blocks (tail mode), merged
    vit = lora.backbone.model
    shared = {id(t) for t in [*vit.parameters(), *vit.buffers()]}
    tensors = [*lora.module.named_parameters(), *lora.module.named_buffers()]
    own = {name: t for name, t in tensors if id(t) not in shared}
    first = len(vit.blocks) - 2
    assert own and all(
        name.startswith(("head.", *(f"blocks.{i}." for i in range(first, len(vit.blocks))))) for name in own
    )
    assert lora.module.blocks[0].attn.qkv.weight is vit.blocks[0].attn.qkv.weight  # the very tensor, not a copy
    assert lora.nbytes == sum(t.numel() * t.element_size() for t in own.values()) < tensor_bytes(vit) / 2
    side = predictor.load("model_losa_all")
    assert side.nbytes == tensor_bytes(side.module) and side.backbone is lora.backbone  # one backbone for both

    # what a whole merged copy of the backbone predicts (the former way), and the backbone left untouched
    artifact = read_artifact(ArtifactStore.from_settings(trained), "model_lora")
    manifest = artifact.manifest
    whole = methods.build(manifest.method, copy.deepcopy(vit), len(manifest.classes), manifest.tail_blocks)
    whole.load_trainable({k: torch.from_numpy(np.array(v)) for k, v in artifact.weights.items()})
    merged = whole.merge().eval()
    _, x = predictor.prepare("model_lora", images)
    with torch.inference_mode():
        expected = merged(x).softmax(-1).numpy()
    got = np.array([[p["scores"][c] for c in lora.classes] for p in predictor.predict("model_lora", images)])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    fresh = Predictor(trained).load("model_linear").backbone.model
    for (name, a), (_, b) in zip(vit.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def other_backbone(trained: Settings, digits_root: Path) -> str:
    """A linear probe on test_vit at 64 px: a second backbone (other preprocessing, other weights)."""
    spec = job_spec(digits_root / "train", {"name": "linear"}, "cache", image_size=64)
    key = run_extraction(spec, trained, NullReporter())["cache_key"]
    out = train_job(spec, trained, key, NullReporter(), trained.data_path / "ckpt" / "model_linear64")
    ArtifactStore.from_settings(trained).save_model("model_linear64", out["weights"], out["manifest"], out["metrics"])
    return "model_linear64"


def test_loaded_weights_stay_under_the_budget(trained: Settings, other_backbone: str) -> None:
    sizes = Predictor(trained)
    for model_id in ("model_losa3", "model_losa_all", "model_linear", other_backbone):
        sizes.load(model_id)
    backbone = tensor_bytes(sizes.cached("model_linear").backbone.model)
    per_model = sizes.memory()["models"]
    # room for the backbone, model_losa3 and model_losa_all, not for model_linear too
    budget = backbone + per_model["model_losa3"] + per_model["model_losa_all"] + per_model["model_linear"] // 2
    predictor = Predictor(trained, memory_bytes=budget)
    for model_id in ("model_losa3", "model_losa_all", "model_linear"):
        predictor.load(model_id)
        assert predictor.memory()["total"] <= budget
    assert list(predictor.memory()["models"]) == ["model_losa_all", "model_linear"]  # the least recently used went
    assert predictor.cached("model_losa_all") is not None  # touched: now the most recently used
    predictor.load(other_backbone)  # another backbone: both test_vit models and their backbone make room
    memory = predictor.memory()
    assert list(memory["models"]) == [other_backbone] and len(memory["backbones"]) == 1
    assert memory["total"] == tensor_bytes(predictor.cached(other_backbone).backbone.model) + per_model[other_backbone]


def test_concurrent_loads_of_one_model_load_it_once(trained: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    predictor = Predictor(trained)
    calls, gate = [], threading.Event()
    original = predictor._load

    def counted(model_id: str):
        calls.append(model_id)
        assert gate.wait(30)
        return original(model_id)

    monkeypatch.setattr(predictor, "_load", counted)
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(predictor.load("model_linear"))) for _ in range(4)]
    for t in threads:
        t.start()
    while not calls:
        threading.Event().wait(0.01)
    assert predictor.cached("model_linear") is None  # loading, not loaded
    gate.set()
    for t in threads:
        t.join(60)
    assert calls == ["model_linear"] and len(got) == 4 and all(m is got[0] for m in got)


def test_an_incomplete_artifact_is_never_loaded(trained: Settings) -> None:
    artifacts = ArtifactStore.from_settings(trained)
    src, dst = artifacts.model("model_linear"), artifacts.model("model_partial")
    dst.write_bytes("config.json", src.read_bytes("config.json"))  # the weights never arrived, nor the marker
    predictor = Predictor(trained)
    with pytest.raises(Incomplete, match="model_partial is incomplete"):
        predictor.load("model_partial")
    assert predictor.cached("model_partial") is None and predictor.memory()["total"] == 0
    with pytest.raises(FileNotFoundError, match="model_never"):
        predictor.load("model_never")


def test_bfloat16_serving(trained: Settings, images: list[bytes]) -> None:
    """What CUDA serves in, run on the CPU: backbone and merged tensors in bfloat16 (half the bytes), side models in
    float32 under bfloat16 autocast; predictions close to float32's."""
    fp32 = Predictor(trained)
    bf16 = Predictor(trained.model_copy(update={"predict_precision": "bf16"}))
    for model_id in ("model_lora", "model_losa_all", "model_linear"):
        a, b = fp32.load(model_id), bf16.load(model_id)
        if model_id == "model_lora":
            assert {t.dtype for t in b.module.parameters()} == {torch.bfloat16} and b.nbytes == a.nbytes // 2
        else:
            assert {t.dtype for t in b.module.parameters()} == {torch.float32}
        pa = np.array([[p["scores"][c] for c in a.classes] for p in fp32.predict(model_id, images)])
        pb = np.array([[p["scores"][c] for c in b.classes] for p in bf16.predict(model_id, images)])
        np.testing.assert_allclose(pb, pa, atol=0.05)
        assert (pa.argmax(1) == pb.argmax(1)).mean() >= 0.8
    assert list(bf16.memory()["backbones"].values())[0] * 2 == list(fp32.memory()["backbones"].values())[0]
    assert {t.dtype for t in bf16.cached("model_linear").backbone.model.parameters()} == {torch.bfloat16}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (serving in bfloat16 on the GPU)")
def test_cuda_serving_matches_the_cpu(trained: Settings, images: list[bytes]) -> None:
    cpu, gpu = Predictor(trained), Predictor(trained.model_copy(update={"device": "cuda"}))
    assert gpu.load("model_lora").backbone.dtype == torch.bfloat16
    for model_id in ("model_lora", "model_losa_all"):
        pa = np.array([[p["scores"][c] for c in p["scores"]] for p in cpu.predict(model_id, images)])
        pb = np.array([[p["scores"][c] for c in p["scores"]] for p in gpu.predict(model_id, images)])
        np.testing.assert_allclose(pb, pa, atol=0.05)


def test_a_load_drops_the_loaded_models_that_were_deleted(trained: Settings) -> None:
    """A deleted model is never asked for again (ids are not reused): it must not keep its memory until the budget
    pushes it out (a soak deleting its jobs as they came saw the inference service grow a few MB a minute)."""
    from storage.redis import JobStore, now

    store = JobStore.from_url(trained.broker_url)
    ids = ("model_losa3", "model_linear", "model_losa_all")
    for model_id in ids:
        store.register_model(
            {
                "id": model_id,
                "object": "model",
                "created_at": now(),
                "job_id": "job_x",
                "owner": None,
                "name": None,
                "method": "losa",
                "mode": "cache",
                "backbone": "test_vit",
                "classes": [str(i) for i in range(10)],
                "metrics": {},
            }
        )
    try:
        predictor = Predictor(trained, registered=store.registered_models)
        predictor.load("model_losa3")
        predictor.load("model_linear")
        store.delete_model("model_losa3")
        predictor.load("model_losa_all")  # a cold load: the deleted model goes, the others stay
        assert set(predictor.memory()["models"]) == {"model_linear", "model_losa_all"}
    finally:
        for model_id in ids:
            store.delete_model(model_id)
