"""An unfactorised ViViT (Arnab et al., ICCV 2021, model 1) made of a timm image VisionTransformer, in place.

Only the embedding changes: `patch_embed` becomes a `TubeletEmbed` (a Conv3d over t x p x p tubelets inflated from
the 2D patch embedding) and `pos_embed` the image's spatial position embeddings repeated for each of the T' temporal
indices (the class token's kept). Tokens are time-major: token 1 + k*S + s is spatial position s at temporal index
k. Everything else is timm's own code: `_pos_embed`, the blocks, `forward_intermediates` (per-layer taps, as for
images) and `forward_head`, whose pooling becomes the mean over patch tokens (`global_pool = "avg"`).

A clip enters as [B, T*3, H, W] (frames stacked along channels, frame-major): timm's ViT entry points unpack a 4-D
input, and that layout is a view of [B, T, 3, H, W]. The ViViT runs at one frame size: a timm ViT built for
dynamic sizes (e.g. `test_vit`) is fixed at its `img_size`. Refused with a BackboneError: models that are not a
plain timm VisionTransformer (RoPE ViTs such as EVA, NaFlex), or without learned absolute position embeddings, or
with a patch embedding that is not one Conv2d (hybrid stems), or that pad inputs dynamically.
"""

from __future__ import annotations

import torch
from torch import nn

from services.errors import BackboneError
from services.video.spec import VideoSpec


class TubeletEmbed(nn.Module):
    """[B, T*3, H, W] -> [B, T' * S, D] tokens, time-major; the attributes timm's ViT reads of a patch embedding."""

    def __init__(self, patch_embed: nn.Module, video: VideoSpec) -> None:
        super().__init__()
        conv: nn.Conv2d = patch_embed.proj
        t, (p, q) = video.tubelet, conv.kernel_size
        self.num_frames, self.tubelet = video.num_frames, t
        self.img_size, self.patch_size = patch_embed.img_size, patch_embed.patch_size
        self.grid_size = patch_embed.grid_size
        self.spatial = self.grid_size[0] * self.grid_size[1]
        self.temporal = video.temporal_positions
        self.num_patches = self.temporal * self.spatial
        self.proj = nn.Conv3d(
            conv.in_channels,
            conv.out_channels,
            (t, p, q),
            stride=(t, *conv.stride),
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            weight = torch.zeros_like(self.proj.weight)
            if video.init == "central_frame":
                weight[:, :, t // 2] = conv.weight
            else:  # filter inflation: the same response to a static clip as the 2D filter to one frame
                weight[:] = (conv.weight / t).unsqueeze(2)
            self.proj.weight.copy_(weight)
            if conv.bias is not None:
                self.proj.bias.copy_(conv.bias)
        self.norm = patch_embed.norm

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if c != 3 * self.num_frames or (h, w) != tuple(self.img_size):
            raise ValueError(
                f"a ViViT of {self.num_frames} frames at {tuple(self.img_size)} takes [B, "
                f"{3 * self.num_frames}, H, W] clips; got {tuple(x.shape)}"
            )
        x = self.proj(x.view(b, self.num_frames, 3, h, w).transpose(1, 2))  # [B, D, T', H/p, W/p]
        return self.norm(x.flatten(2).transpose(1, 2))


def check_plain_vit(vit: nn.Module, name: str) -> None:
    """Raise BackboneError unless `vit` is a timm VisionTransformer that a ViViT can be made of."""
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    why = None
    if not isinstance(vit, VisionTransformer):
        why = f"it is a {type(vit).__name__}, not a plain timm VisionTransformer (RoPE and NaFlex ViTs are not)"
    elif getattr(vit, "pos_embed", None) is None:
        why = "it has no learned absolute position embeddings to repeat over time"
    elif not isinstance(vit.patch_embed, PatchEmbed) or not isinstance(vit.patch_embed.proj, nn.Conv2d):
        why = "its patch embedding is not a single Conv2d (a hybrid stem)"
    elif getattr(vit.patch_embed, "dynamic_img_pad", False):
        why = "it pads its inputs dynamically"
    if why:
        raise BackboneError(f"backbone {name!r} cannot be made a ViViT: {why}")


def to_vivit(vit: nn.Module, video: VideoSpec, name: str = "") -> nn.Module:
    """Turn timm ViT `vit` into the ViViT of `video`, in place (also on the meta device); returns it."""
    check_plain_vit(vit, name)
    embed = TubeletEmbed(vit.patch_embed, video)
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    with torch.no_grad():
        pos = vit.pos_embed  # [1, prefix + S, D]: the grid the image model was built for
        spatial = pos[:, prefix:].repeat(1, embed.temporal, 1)
        repeated = torch.cat([pos[:, :prefix], spatial], dim=1)
    vit.patch_embed = embed
    vit.pos_embed = nn.Parameter(repeated, requires_grad=vit.pos_embed.requires_grad)
    vit.dynamic_img_size = False  # one clip size; timm's _pos_embed then adds pos_embed as it is
    vit.global_pool = "avg"  # the mean over patch tokens, as the side networks read a video
    return vit
