"""The planner: the ViT table against timm itself (meta device), cache sizes, the quota verdict and its advice,
eviction, memory budgets, and `sidetune plan`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from services.architectures import architecture, forward_flops
from services.jobs.plan_text import GB, describe
from services.jobs.planner import MIB, plan
from services.modality import modality_for
from services.spec import JobSpec
from storage.cache import CacheEntry
from storage.settings import Settings
from worker.cli import main

LISTED = [
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
    "vit_huge_patch14_224",
    "vit_giant_patch14_224",
    "vit_gigantic_patch14_224",
    "vit_base_patch32_384",
    "test_vit",
    "vit_small_patch14_dinov2",
    "vit_base_patch14_reg4_dinov2",
    "vit_giant_patch14_dinov2",
    "vit_large_patch14_clip_336",
]
# Every timm name the table claims to know, so a new timm cannot silently disagree with it.
CLAIMED = sorted({n for n in timm.list_models("vit_*") if architecture(n) is not None} - set(LISTED))


def timm_shape(name: str, image_size: int | None = None) -> dict:
    kwargs = {} if image_size is None else {"img_size": image_size}
    with torch.device("meta"):
        vit = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    fc1, fc2 = vit.blocks[0].mlp.fc1, vit.blocks[0].mlp.fc2
    return {
        "num_layers": len(vit.blocks),
        "dim": vit.embed_dim,
        "num_prefix_tokens": vit.num_prefix_tokens,
        "tokens": vit.patch_embed.num_patches + vit.num_prefix_tokens,
        "global_pool": vit.global_pool,
        "patch_size": vit.patch_embed.patch_size[0],
        "image_size": vit.patch_embed.img_size[0],
        "mlp_macs": fc1.in_features * fc1.out_features + fc2.in_features * fc2.out_features,
    }


def table_shape(name: str, image_size: int | None = None) -> dict:
    arch = architecture(name, image_size)
    assert arch is not None, name
    return arch.model_dump(exclude={"name", "num_frames", "tubelet", "temporal_positions"})  # video: test_video_planner


@pytest.mark.parametrize("name", LISTED + CLAIMED)
def test_architecture_table_matches_timm(name):
    assert table_shape(name) == timm_shape(name)


def test_architecture_examples_and_image_size():
    b = architecture("vit_base_patch16_224.augreg_in21k")  # a pretrained tag changes nothing
    assert (b.num_layers, b.dim, b.tokens) == (12, 768, 197)
    g = architecture("vit_giant_patch14_224")
    assert (g.num_layers, g.dim, g.tokens) == (40, 1408, 257)
    t = architecture("test_vit")
    assert (t.num_layers, t.dim, t.tokens, t.image_size) == (6, 64, 101, 160)
    assert architecture("vit_small_patch14_reg4_dinov2").num_prefix_tokens == 5
    for name, size in (("vit_base_patch16_224", 384), ("test_vit", 96), ("vit_small_patch14_dinov2", 224)):
        assert table_shape(name, size) == timm_shape(name, size)
    for unknown in ("resnet50", "vit_base_patch16_siglip_224", "vit_base_patch16_rope_224", "deit_base_patch16_224"):
        assert architecture(unknown) is None


def test_flops_match_the_known_vit_b_cost():
    # ViT-B/16 at 224 px: 17.6 GMACs per image (timm's model card, fvcore counts).
    assert forward_flops(architecture("vit_base_patch16_224"), 1) / 2 == pytest.approx(17.6e9, rel=0.02)


# ---- plans on a small ImageFolder ------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """24 images in 3 classes."""
    root = tmp_path_factory.mktemp("planner") / "images"
    rng = np.random.default_rng(0)
    for i in range(24):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"c{i % 3}" / f"{i}.png")
    return root


def job(folder: Path, method: dict, backbone: str | dict = "test_vit", **extra) -> JobSpec:
    backbone = {"name": backbone} if isinstance(backbone, str) else backbone
    return JobSpec.model_validate({"dataset": {"path": str(folder)}, "backbone": backbone, "method": method, **extra})


@pytest.fixture
def settings(tmp_path: Path, folder: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", allowed_roots=[folder.parent], device="cuda")


def with_(settings: Settings, **changes) -> Settings:
    return Settings(**{**settings.model_dump(), **changes})


def test_cache_sizes_follow_what_is_cached(folder, settings):
    p = plan(job(folder, {"name": "losa"}), settings)  # every block, every token
    assert (p.images, p.classes, p.train_images + p.val_images) == (24, 3, 24)
    assert p.cached_layers == list(range(6)) and p.cached_token_mode == "all" and p.cached_tokens == 101
    assert p.bytes_per_image == 6 * 101 * 64 * 2 and p.cache_bytes == 24 * 6 * 101 * 64 * 2 == p.expected_cache_bytes
    assert p.fits is True and p.evict_bytes == 0 and p.quota_bytes is None and p.cache_used_bytes == 0
    assert p.train_feature_bytes == p.train_images * 6 * 101 * 64 * 2
    assert p.extraction_s == max(p.extraction_compute_s, p.extraction_write_s) > 0
    assert "24 images x 6 layers x 101 tokens x 64 x 2 B" in p.message

    linear = plan(job(folder, {"name": "linear"}), settings)  # the last block's class token
    assert (linear.cached_layers, linear.cached_token_mode, linear.cache_bytes) == ([5], "cls", 24 * 64 * 2)
    tail = plan(job(folder, {"name": "lora"}, execution={"mode": "tail", "tail_blocks": 2}), settings)
    assert (tail.cached_layers, tail.cache_bytes) == ([3], 24 * 101 * 64 * 2)
    lossy = plan(job(folder, {"name": "losa"}, extraction={"codec": "blosc", "keepbits": 4}), settings)
    assert lossy.cache_bytes == p.cache_bytes and lossy.expected_cache_bytes == int(p.cache_bytes * 10 / 16)
    bigger = plan(job(folder, {"name": "losa"}, backbone={"name": "test_vit", "image_size": 320}), settings)
    assert bigger.cached_tokens == 401


def test_a_cache_over_the_quota_does_not_fit_and_says_what_to_change(folder, settings):
    upper = 24 * 6 * 101 * 64 * 2  # 1.86 MB
    p = plan(job(folder, {"name": "losa"}), with_(settings, cache_quota_gb=0.001))
    assert p.fits is False and p.quota_bytes == 10**6 and p.available_bytes == 10**6
    m = p.message
    assert m.startswith(f"the feature cache for this job needs {upper / GB:.2f} GB (24 images x 6 layers x 101 tokens")
    assert "the cache quota is 0.00 GB (SIDETUNE_CACHE_QUOTA_GB)" in m
    assert "method.layers 3" in m  # 3 of 6 layers fit in 1 MB
    assert 'extraction.codec "blosc" with extraction.keepbits 2' in m  # (6 + 2) / 16 of 1.86 MB fits
    assert 'execution.mode "online"' in m and "raise SIDETUNE_CACHE_QUOTA_GB to at least 0.01" in m
    assert "extraction.tokens" not in m  # losa mixes every token: pooled tokens do not apply

    explicit = job(folder, {"name": "linear"}, extraction={"layers": "all", "tokens": "all"})
    m = plan(explicit, with_(settings, cache_quota_gb=0.0005)).message
    assert 'extraction.layers "auto": 1 layers instead of 6' in m and 'extraction.tokens "cls"' in m
    assert "method.layers" not in m


def test_modes_without_a_cache_always_fit(folder, settings):
    tiny = with_(settings, cache_quota_gb=1e-9)
    for spec in (job(folder, {"name": "lora"}), job(folder, {"name": "losa"}, execution={"mode": "online"})):
        p = plan(spec, tiny)
        assert p.needs_cache is False and p.fits is True and p.cache_bytes is None
        assert "needs no feature cache" in p.message


def test_a_backbone_outside_the_size_table_is_planned_without_sizes(folder, settings):
    spec = job(folder, {"name": "losa"}, backbone="vit_base_patch16_siglip_224")
    p = plan(spec, with_(settings, cache_quota_gb=1e-9))
    assert p.fits is None and p.architecture is None and p.cache_bytes is None
    assert "unknown until extraction" in p.message


def test_layers_the_backbone_lacks_are_a_value_error(folder, settings):
    with pytest.raises(ValueError, match="do not exist"):
        plan(job(folder, {"name": "losa"}, extraction={"layers": [0, 9]}), settings)


def test_memory_budgets_decide_where_training_features_live(folder, settings):
    spec = job(folder, {"name": "losa"})
    assert plan(spec, settings).train_feature_bytes == 18 * 6 * 101 * 64 * 2  # 1.4 MB
    p = plan(spec, settings)  # no caps: half the available RAM; the device budget is the worker's to find out
    assert p.train_in_memory and p.train_on_gpu is None and p.gpu_budget_bytes is None
    assert "GPU-resident if the worker's device has room" in describe(p, modality_for(spec.backbone))
    p = plan(spec, with_(settings, gpu_cache_mb=8192))  # a cap: the planner judges against it
    assert p.train_in_memory and p.train_on_gpu
    p = plan(spec, with_(settings, gpu_cache_mb=2))  # the split gets half: 1 MiB
    assert p.train_in_memory and not p.train_on_gpu and p.gpu_budget_bytes == MIB
    p = plan(spec, with_(settings, train_memory_mb=2))
    assert not p.train_in_memory and not p.train_on_gpu
    assert not plan(spec, with_(settings, device="cpu")).train_on_gpu
    cpu = plan(spec, with_(settings, device="cpu"))
    assert cpu.assumed_tflops == 0.2 and cpu.extraction_compute_s > plan(spec, settings).extraction_compute_s


def complete_entry(path: Path, rows: int, last_used: float) -> int:
    entry = CacheEntry(path)
    entry.create(
        labels=np.zeros(rows, np.int64),
        layers=[0],
        tokens="all",
        token_count=101,
        dim=64,
        batch_size=rows,
        meta={"num_prefix_tokens": 1},
    )
    entry.write_batch(0, np.ones((rows, 1, 101, 64), np.float16), np.ones(rows, bool))
    entry.mark_complete({})
    (path / "last_used").write_text(str(last_used))
    return entry.nbytes()


def test_existing_entries_are_evicted_least_recently_used_first(folder, settings):
    cache = settings.cache_dir
    old = complete_entry(cache / "fam" / "old", 100, last_used=1.0)  # 1.29 MB each
    new = complete_entry(cache / "fam" / "new", 100, last_used=2.0)
    busy = CacheEntry(cache / "fam" / "busy")  # being written: not evictable
    busy.create(
        labels=np.zeros(10, np.int64), layers=[0], tokens="all", token_count=101, dim=64, batch_size=10, meta={}
    )
    spec = job(folder, {"name": "losa"})  # 1.86 MB
    p = plan(spec, with_(settings, cache_quota_gb=0.0045))
    assert p.fits is True and p.evict_entries == 0  # 4.5 MB - 2.6 MB used leaves room
    p = plan(spec, with_(settings, cache_quota_gb=0.004))
    assert p.cache_used_bytes > old + new and p.cache_evictable_bytes == old + new
    assert p.fits is True and p.evict_entries == 1 and p.evict_bytes == old
    assert "fits after evicting 0.00 GB (1 least recently used entries)" in p.message
    p = plan(spec, with_(settings, cache_quota_gb=0.0025))
    assert p.fits is True and p.evict_entries == 2
    p = plan(spec, with_(settings, cache_quota_gb=0.001))
    assert p.fits is False and p.available_bytes == 10**6 - (p.cache_used_bytes - old - new)


# ---- sidetune plan ---------------------------------------------------------------------------------


def test_cli_plan_prints_the_plan_and_exits_1_when_it_does_not_fit(folder, tmp_path, monkeypatch, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "dataset": {"path": str(folder)},
                "backbone": {"name": "vit_base_patch16_224"},
                "method": {"name": "losa", "rank": 16},
            }
        )
    )
    monkeypatch.setenv("SIDETUNE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SIDETUNE_ALLOWED_ROOTS", str(folder.parent))
    assert main(["plan", str(spec)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"backbone +12 blocks, 197 tokens \(1 prefix\), dim 768, 224 px", out)
    assert "3.63 MB per image" in out and re.search(r"fits +yes", out)
    assert "24 images x 12 layers x 197 tokens x 768 x 2 B" in out and "assumed 50 TFLOP/s" in out

    monkeypatch.setenv("SIDETUNE_CACHE_QUOTA_GB", "0.01")
    assert main(["plan", str(spec)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"fits +NO", out) and "Change one of" in out and "method.layers 1" in out
    assert main(["plan", str(spec), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["fits"] is False

    monkeypatch.setenv("SIDETUNE_ALLOWED_ROOTS", str(tmp_path / "elsewhere"))
    assert main(["plan", str(spec)]) == 2
    assert "outside the allowed roots" in capsys.readouterr().err
