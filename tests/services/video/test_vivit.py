"""The ViViT made of a timm image ViT (services/video/backbone.py): with one temporal position and central-frame init
it is the image ViT exactly; filter inflation makes it blind to temporal order; its tokens are time-major with the
class token first; models it cannot be made of are refused by name; clips are normalised as frames are."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch

from services.backbones import load_backbone
from services.errors import BackboneError
from services.spec import BackboneSpec
from services.video.backbone import to_vivit
from services.video.spec import VideoSpec


def image_vit(name: str, size: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, img_size=size).eval()


def taps(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return model.forward_intermediates(
        x, indices=[0, 2, 5], norm=False, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
    )


@pytest.mark.parametrize("name", ["test_vit", "vit_tiny_patch16_224"])
@pytest.mark.parametrize(("frames", "tubelet"), [(1, 1), (2, 2), (4, 4)])
def test_one_temporal_position_with_central_frame_is_the_image_vit(name: str, frames: int, tubelet: int) -> None:
    vit = image_vit(name)
    vivit = to_vivit(copy.deepcopy(vit), VideoSpec(num_frames=frames, tubelet=tubelet, init="central_frame"))
    clip = torch.randn(2, frames, 3, 32, 32)
    with torch.no_grad():
        want, got = taps(vit, clip[:, tubelet // 2]), taps(vivit, clip.flatten(1, 2))
        for (w_patch, w_prefix), (g_patch, g_prefix) in zip(want, got, strict=True):
            assert torch.equal(w_patch, g_patch) and torch.equal(w_prefix, g_prefix)
        # the head pools the patch tokens for a video; the image ViT's own avg pooling gives the same
        vit.global_pool = "avg"
        assert torch.equal(vit(clip[:, tubelet // 2]), vivit(clip.flatten(1, 2)))


def test_tubelet_weights_and_position_embeddings() -> None:
    vit = image_vit("test_vit")
    w2d, pos = vit.patch_embed.proj.weight.detach().clone(), vit.pos_embed.detach().clone()
    central = to_vivit(copy.deepcopy(vit), VideoSpec(num_frames=6, tubelet=3, init="central_frame"))
    w = central.patch_embed.proj.weight
    assert w.shape == (64, 3, 3, 16, 16)
    assert torch.equal(w[:, :, 1], w2d) and not w[:, :, [0, 2]].any()
    inflated = to_vivit(copy.deepcopy(vit), VideoSpec(num_frames=6, tubelet=3, init="filter_inflation"))
    assert all(torch.allclose(inflated.patch_embed.proj.weight[:, :, k], w2d / 3) for k in range(3))
    # class token's embedding kept, the 4 spatial ones repeated for each of the 2 temporal positions (time-major)
    assert central.pos_embed.shape == (1, 1 + 2 * 4, 64)
    assert torch.equal(central.pos_embed[:, :1], pos[:, :1])
    assert torch.equal(central.pos_embed[:, 1:5], pos[:, 1:]) and torch.equal(central.pos_embed[:, 5:], pos[:, 1:])
    assert central.patch_embed.num_patches == 8 and central.global_pool == "avg"


def test_tokens_are_time_major() -> None:
    """A clip that differs from another only in its second tubelet changes only the second block of S tokens at
    the embedding (before attention mixes them)."""
    vivit = to_vivit(image_vit("test_vit"), VideoSpec(num_frames=4, tubelet=2))
    a = torch.randn(1, 4, 3, 32, 32)
    b = a.clone()
    b[:, 2:] = torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        ea, eb = vivit.patch_embed(a.flatten(1, 2)), vivit.patch_embed(b.flatten(1, 2))
    assert ea.shape == (1, 8, 64)
    assert torch.equal(ea[:, :4], eb[:, :4]) and not torch.allclose(ea[:, 4:], eb[:, 4:])


def test_filter_inflation_is_blind_to_temporal_order() -> None:
    """Reversing a clip permutes its tubelets (each the mean of its frames) and the frozen ViViT's pooled output is
    the same: only a side network's temporal mixer can see the order."""
    vivit = to_vivit(image_vit("test_vit"), VideoSpec(num_frames=8, tubelet=2, init="filter_inflation"))
    clip = torch.randn(3, 8, 3, 32, 32)
    with torch.no_grad():
        forward, backward = vivit(clip.flatten(1, 2)), vivit(clip.flip(1).flatten(1, 2))
        other = vivit(torch.randn(3, 8, 3, 32, 32).flatten(1, 2))
    assert torch.allclose(forward, backward, atol=1e-5)
    assert not torch.allclose(forward, other, atol=1e-2)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("eva02_tiny_patch14_224", "not a plain timm VisionTransformer"),
        ("vit_base_patch16_rope_224", "not a plain timm VisionTransformer"),
        ("naflexvit_base_patch16_gap", "not a plain timm VisionTransformer"),
        ("vit_base_patch16_siglip_gap_224", None),  # a plain ViT (no class token): fine
        ("vit_small_r26_s32_224", "not a single Conv2d"),
    ],
)
def test_models_a_vivit_cannot_be_made_of_are_refused_by_name(name: str, why: str | None) -> None:
    with torch.device("meta"):
        vit = timm.create_model(name, pretrained=False, num_classes=0)
    if why is None:
        assert to_vivit(vit, VideoSpec(num_frames=4)).patch_embed.temporal == 2
        return
    with pytest.raises(BackboneError, match=why) as e:
        to_vivit(vit, VideoSpec(num_frames=4), name)
    assert name in str(e.value)


def test_load_backbone_builds_the_vivit_and_normalises_clips_as_frames() -> None:
    video = VideoSpec(num_frames=4, tubelet=2, init="filter_inflation")
    spec = BackboneSpec(name="test_vit", pretrained=False, image_size=32, video=video)
    backbone = load_backbone(spec)
    image = load_backbone(spec.model_copy(update={"video": None}))
    assert backbone.tokens == 1 + 2 * 4 and backbone.temporal == 2 and image.temporal is None
    assert backbone.info()["global_pool"] == "avg" and backbone.info()["temporal"] == 2
    assert not any(p.requires_grad for p in backbone.model.parameters())
    # the weights' hash is the ViViT's: another init or frame count is another backbone (and cache entry)
    central = load_backbone(spec.model_copy(update={"video": video.model_copy(update={"init": "central_frame"})}))
    assert len({backbone.weights_hash, central.weights_hash, image.weights_hash}) == 3
    clips = np.random.default_rng(0).integers(0, 256, (2, 4, 32, 32, 3), dtype=np.uint8)
    x = backbone.input(clips)
    assert x.shape == (2, 12, 32, 32) and x.is_contiguous()
    per_frame = image.input(clips.reshape(8, 32, 32, 3)).reshape(2, 12, 32, 32)
    assert torch.equal(x, per_frame)
    feats = backbone.intermediates(x, [5])
    assert feats.shape == (2, 1, 9, 64)


@pytest.mark.parametrize(("name", "frames", "tubelet"), [("vit_base_patch16_224", 16, 2), ("test_vit", 8, 4)])
def test_planner_shapes_of_vivits_match_the_built_model(name: str, frames: int, tubelet: int) -> None:
    from services.architectures import architecture, forward_flops
    from services.modality import modality_for

    video = VideoSpec(num_frames=frames, tubelet=tubelet)
    with torch.device("meta"):
        vivit = to_vivit(timm.create_model(name, pretrained=False, num_classes=0), video)
    arch = architecture(name, None, video)
    assert arch.tokens == vivit.patch_embed.num_patches + vivit.num_prefix_tokens
    assert arch.global_pool == vivit.global_pool == "avg" and arch.temporal_positions == frames // tubelet
    # FLOPs: every block on T' S + 1 tokens, and the Conv3d's 3 t p^2 multiply-adds per patch token and channel
    t, d, p = arch.tokens, arch.dim, arch.patch_size
    blocks = arch.num_layers * (t * (4 * d * d + arch.mlp_macs) + 2 * t * t * d)
    assert forward_flops(arch, 1) == 2 * (blocks + (t - 1) * 3 * tubelet * p * p * d)
    conv = vivit.patch_embed.proj
    assert conv.weight[0].numel() == 3 * tubelet * p * p  # the Conv3d's multiply-adds per output
    # `auto` extraction batches: 32 images; clips by bytes (ViViT-B/16, 16 frames, every layer: 28.9 MB -> 4)
    assert modality_for(video).extraction_rows("auto", 12 * 1569 * 768 * 2) == 4
    assert modality_for(None).extraction_rows("auto", 12 * 197 * 768 * 2) == 32
    assert modality_for(video).extraction_rows(7, 12 * 1569 * 768 * 2) == 7
