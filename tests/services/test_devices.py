"""Devices and precision: the frozen forward's precision is part of the cache key and bf16 stays close to fp32; on a
GPU, device-to-host copies run on a side stream of the activations' own device (`cuda:N` honoured end to end)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.backbones import load_backbone, resolve_precision
from services.extraction import _HostBuffers, run_extraction
from services.jobs.progress import NullReporter
from services.spec import BackboneSpec, JobSpec
from storage.cache import FeatureCache
from storage.settings import Settings

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


def spec_for(path: Path, precision: str = "auto") -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"path": str(path)},
            "backbone": {"name": "test_vit", "pretrained": False, "image_size": 64, "precision": precision},
            "method": {"name": "losa", "rank": 4},
            "extraction": {"batch_size": 16},
        }
    )


def test_precision_auto_is_bf16_on_a_gpu_and_fp32_on_the_cpu() -> None:
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda:1") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16"
    backbone = load_backbone(BackboneSpec(name="test_vit", pretrained=False, precision="bf16"))
    assert backbone.dtype == torch.bfloat16 and next(backbone.model.parameters()).dtype == torch.bfloat16
    fp32 = load_backbone(BackboneSpec(name="test_vit", pretrained=False))
    assert fp32.weights_hash == backbone.weights_hash  # the same weights, whatever the forward's precision


def test_a_bf16_cache_is_its_own_entry_and_close_to_fp32(settings: Settings, digits_root: Path) -> None:
    fp32 = run_extraction(spec_for(digits_root / "train", "fp32"), settings, NullReporter())
    bf16 = run_extraction(spec_for(digits_root / "train", "bf16"), settings, NullReporter())
    assert not bf16["cache_hit"] and bf16["cache_key"].split("/")[0] != fp32["cache_key"].split("/")[0]
    cache = FeatureCache(settings.cache_dir)
    a = cache.entry(fp32["cache_key"]).read().astype(np.float32)
    b = cache.entry(bf16["cache_key"]).read().astype(np.float32)
    rel = np.linalg.norm(b - a) / np.linalg.norm(a)
    assert 0 < rel < 2e-2, rel  # bf16 weights and activations: a few 1e-3 relative


@cuda
def test_host_copies_run_on_a_side_stream_of_the_tensors_own_device() -> None:
    device = torch.device(f"cuda:{torch.cuda.device_count() - 1}")  # not the current device when there are several
    buffers = _HostBuffers(device, slots=2)
    assert buffers.stream.device == device
    for _ in range(3):  # more copies than buffers: each is given back before it is reused
        feats = torch.randn(8, 3, 5, 16, device=device)
        host, ready, done = buffers.copy(feats)
        ready()
        assert host.is_pinned()
        np.testing.assert_array_equal(host.numpy(), feats.half().cpu().numpy())
        done()


@cuda
def test_extraction_on_cuda_n_matches_the_cpu(settings: Settings, digits_root: Path) -> None:
    gpu = settings.model_copy(update={"device": f"cuda:{torch.cuda.device_count() - 1}", "loader_workers": 2})
    spec = spec_for(digits_root / "train", "fp32")
    on_cpu = FeatureCache(settings.cache_dir).entry(run_extraction(spec, settings, NullReporter())["cache_key"])
    gpu = gpu.model_copy(update={"data_dir": settings.data_dir / "gpu"})
    on_gpu = FeatureCache(gpu.cache_dir).entry(run_extraction(spec, gpu, NullReporter())["cache_key"])
    a, b = on_cpu.read().astype(np.float32), on_gpu.read().astype(np.float32)
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < 1e-2  # TF32 matmuls at most
