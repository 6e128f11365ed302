"""timm's plain ViTs without building them (no torch), for the spec, the planner and the API: which names sidetune
supports (`vit_names.txt`, timm's `vision_transformer` and `deit` models: `VisionTransformer`s; those without a class
token are read with mean pooling, an attention-pooling head is not used), and the shapes of their main families
(blocks, width, tokens, MLP size), by model name. Checked against timm in tests/services/jobs/test_planner.py and
tests/services/test_backbone_names.py; after a timm upgrade, regenerate the names with
`python -m services.architectures`.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from pydantic import BaseModel, Field

from services.modality import modality_for
from services.video.spec import VideoSpec

# timm's plain ViT sizes: blocks, width, MLP hidden width (fc1 -> fc2 of a GELU MLP).
_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (12, 192, 768),
    "small": (12, 384, 1536),
    "base": (12, 768, 3072),
    "large": (24, 1024, 4096),
    "huge": (32, 1280, 5120),
    "giant": (40, 1408, 6144),
    "gigantic": (48, 1664, 8192),
}
_PLAIN = re.compile(
    r"^vit_(?P<size>tiny|small|base|large|huge|giant|gigantic)_patch(?P<patch>\d+)(?:_clip|_clip_quickgelu)?"
    r"_(?P<img>\d+)$"
)
_DINOV2 = re.compile(r"^vit_(?P<size>small|base|large|giant)_patch14(?:_reg(?P<reg>\d+))?_dinov2$")


class Architecture(BaseModel):
    """The shape of a ViT backbone as the cache sees it."""

    name: str = Field(..., description="timm model name (a pretrained tag after `.` is ignored).")
    num_layers: int = Field(..., description="Transformer blocks.")
    dim: int = Field(..., description="Embedding width D.")
    tokens: int = Field(..., description="Tokens per image T: patches plus prefix tokens.")
    num_prefix_tokens: int = Field(..., description="Class and register tokens before the patches.")
    image_size: int = Field(..., description="Input size in pixels (`backbone.image_size` or the model's own).")
    patch_size: int = Field(..., description="Patch size in pixels.")
    mlp_macs: int = Field(..., description="Multiply-accumulates of one block's MLP per token (fc1 + fc2).")
    global_pool: str = Field(
        ...,
        description="timm's pooling of the final tokens (`token`: the class token, `avg`: "
        "the mean of the patch tokens, a ViViT's).",
    )
    num_frames: int | None = Field(None, description="A ViViT's frames per clip; null for images.")
    tubelet: int | None = Field(None, description="A ViViT's frames per tubelet; null for images.")
    temporal_positions: int | None = Field(
        None, description="A ViViT's temporal positions T' = frames / tubelet; its tokens are T' x S + prefix."
    )


def architecture(name: str, image_size: int | None = None, video: VideoSpec | None = None) -> Architecture | None:
    """The shape of timm ViT `name` at `image_size` (default: its own), or of the ViViT of `video` made of it; None
    outside the known families."""
    base = name.split(".")[0]
    if base == "test_vit":  # timm's test model: 6 blocks, width 64, MLP 192, 160 px
        layers, dim, hidden, mlp_macs, patch, img, prefix = 6, 64, 192, 2 * 64 * 192, 16, 160, 1
    elif m := _PLAIN.match(base):
        layers, dim, hidden = _SIZES[m["size"]]
        mlp_macs, patch, img, prefix = 2 * dim * hidden, int(m["patch"]), int(m["img"]), 1
    elif m := _DINOV2.match(base):
        layers, dim, hidden = _SIZES[m["size"]]
        mlp_macs = 2 * dim * hidden
        if m["size"] == "giant":  # DINOv2-g: width 1536 and a SwiGLU MLP (fc1 1536 -> 8192, fc2 4096 -> 1536)
            dim, mlp_macs = 1536, 1536 * 8192 + 4096 * 1536
        patch, img, prefix = 14, 518, 1 + int(m["reg"] or 0)
    else:
        return None
    img = image_size or img
    layout = modality_for(video).layout((img // patch) ** 2)
    return Architecture(
        name=name,
        num_layers=layers,
        dim=dim,
        tokens=layout.patches + prefix,
        num_prefix_tokens=prefix,
        image_size=img,
        patch_size=patch,
        mlp_macs=mlp_macs,
        global_pool=layout.global_pool,
        num_frames=layout.num_frames,
        tubelet=layout.tubelet,
        temporal_positions=layout.temporal_positions,
    )


def forward_flops(arch: Architecture, images: int) -> float:
    """FLOPs of full backbone forwards (2 per multiply-accumulate): per block and token, qkv and proj (4 D^2)
    and the MLP; per block, attention scores and their weighted sum (2 T^2 D); and the patch (ViViT: tubelet)
    embedding. An upper bound for extraction, which stops after the last block it caches (forward_intermediates'
    stop_early). `images` counts clips for a ViViT."""
    t, d = arch.tokens, arch.dim
    patches = t - arch.num_prefix_tokens
    block = t * (4 * d * d + arch.mlp_macs) + 2 * t * t * d
    return 2.0 * images * (arch.num_layers * block + patches * 3 * (arch.tubelet or 1) * arch.patch_size**2 * d)


def parameters(arch: Architecture) -> int:
    """About the backbone's parameters: per block qkv, proj and the MLP (biases and norms left out), the patch (ViViT:
    tubelet) embedding and the position embeddings."""
    d = arch.dim
    embed = 3 * (arch.tubelet or 1) * arch.patch_size**2 * d + arch.tokens * d
    return arch.num_layers * (4 * d * d + arch.mlp_macs) + embed


ACTIVATION_BYTES_PER_TOKEN_DIM = 34  # a transformer block's saved activations, 16-bit, no attention matrix


def backprop_bytes(arch: Architecture, blocks: int, batch: int, every_weight: bool) -> int:
    """Device memory, roughly, of a training step that backpropagates through the last `blocks` blocks at `batch`:
    the fp32 weights, gradients and AdamW's two moments of every weight when `every_weight` (full fine-tuning; the
    adapters of the others are small), and the activations the backward pass keeps, 34 bytes per token, channel and
    block under bf16 autocast with a memory-efficient attention that keeps no T x T matrix (Korthikanti et al.,
    "Reducing Activation Recomputation in Large Transformer Models", 2022). An estimate for the planner, within a
    factor of about 1.5 of what PyTorch's allocator reports."""
    weights = parameters(arch) * (16 if every_weight else 4)
    return weights + ACTIVATION_BYTES_PER_TOKEN_DIM * arch.tokens * arch.dim * blocks * batch


NAMES_FILE = Path(__file__).with_name("vit_names.txt")


@cache
def supported_names() -> frozenset[str]:
    """The timm model names (without pretrained tags) that sidetune supports as backbones."""
    return frozenset(line.strip() for line in NAMES_FILE.read_text().splitlines() if line.strip())


def unsupported_backbone(name: str) -> str | None:
    """Why `name` (a timm name, optionally `.tag`) cannot be a backbone, or None if it can."""
    base = name.split(".")[0]
    if base in supported_names():
        return None
    near = sorted(n for n in supported_names() if n.startswith(base.split("_")[0]))[:3]
    hint = f" (e.g. {', '.join(near)})" if near else " (e.g. vit_base_patch16_224, vit_small_patch14_dinov2)"
    return (
        f"backbone {name!r} is not a timm ViT that sidetune supports: it takes the plain ViTs of timm's "
        f"vision_transformer and deit modules{hint}"
    )


def timm_vit_names() -> list[str]:
    """What `vit_names.txt` should hold, from the installed timm (imports torch; builds each model on the meta
    device): its `vision_transformer` and `deit` models whose final norms are LayerNorms (or none), which is what
    the readout of services/backbones.py reads."""
    import timm
    import torch

    names = []
    for name in timm.list_models(module=["vision_transformer", "deit"]):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
        norms = (model.norm, model.fc_norm)
        if all(isinstance(n, torch.nn.LayerNorm | torch.nn.Identity) for n in norms) and hasattr(
            model, "forward_intermediates"
        ):
            names.append(name)
    return sorted(names)


if __name__ == "__main__":
    NAMES_FILE.write_text("\n".join(timm_vit_names()) + "\n")
    print(f"wrote {len(supported_names.__wrapped__())} names to {NAMES_FILE}")
