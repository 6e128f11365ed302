"""Frozen timm ViT backbones: creation (pretrained tag, local safetensors checkpoint, or seeded random init),
the eval transform from the model's own data config, and per-layer token activations through timm's
`forward_intermediates` (prefix tokens included), the stable way to tap a ViT's blocks. The backbone's modality
(services/modality/) wraps the ViT: a video's makes it an unfactorised ViViT (services/video/backbone.py) that takes
clips [B, T*3, H, W]. The eval transform's split between loaders and device is services/data/transforms.py.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import timm
import torch
from timm.data import create_transform, resolve_data_config

from services.data.transforms import SplitTransform
from services.errors import BackboneError
from services.modality import modality_for
from services.spec import BackboneSpec
from storage.cache.meta import DataConfig, EntryDescription


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _layer_norm(module: torch.nn.Module, prefix: str) -> dict[str, np.ndarray]:
    if isinstance(module, torch.nn.LayerNorm) and module.elementwise_affine:
        return {
            f"{prefix}.weight": module.weight.detach().float().cpu().numpy(),
            f"{prefix}.bias": module.bias.detach().float().cpu().numpy(),
        }
    if isinstance(module, torch.nn.Identity):
        return {}
    raise BackboneError(f"unsupported final norm {type(module).__name__}; sidetune supports LayerNorm ViTs")


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """`auto`: bf16 on a GPU (the frozen forward's activations are stored as float16 anyway), fp32 on a CPU."""
    if precision != "auto":
        return precision
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


@dataclass
class Backbone:
    spec: BackboneSpec
    model: torch.nn.Module
    device: torch.device
    data_config: DataConfig
    weights_hash: str
    transform: Any = field(repr=False)
    precision: str = "fp32"  # of the frozen forward: the weights are cast once (fp32 weights are hashed)

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def split(self) -> SplitTransform:
        """The eval transform's PIL steps (loader side) and normalisation (device side)."""
        split = SplitTransform.of(self.transform)
        if split is None:  # timm's eval transforms are all [Resize, CenterCrop, ToTensor, Normalize]
            raise BackboneError(f"backbone {self.spec.name!r}: unexpected eval transform {self.transform}")
        return split

    def input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A uint8 batch [B, H, W, 3] (clips: [B, T, H, W, 3]) from a loader -> the normalised input on the device,
        in the forward's dtype."""
        return self.split.to_input(images, self.device, self.dtype)

    @property
    def image_size(self) -> int:
        """The side of the eval transform's square output (each frame of a clip alike)."""
        return int(self.data_config["input_size"][-1])

    @property
    def num_layers(self) -> int:
        return len(self.model.blocks)

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    @property
    def tokens(self) -> int:
        return self.model.patch_embed.num_patches + self.num_prefix_tokens

    @property
    def temporal(self) -> int | None:
        """T', the temporal positions of a ViViT's token grid; None for an image backbone."""
        return getattr(self.model.patch_embed, "temporal", None)

    def info(self) -> EntryDescription:
        """What a trainer or predictor needs to know about the activations, JSON-serialisable (a cache entry's
        description of its backbone)."""
        return EntryDescription(
            backbone=self.spec.name,
            weights_hash=self.weights_hash,
            precision=self.precision,
            num_layers=self.num_layers,
            tokens=self.tokens,
            dim=self.dim,
            num_prefix_tokens=self.num_prefix_tokens,
            global_pool=self.model.global_pool,
            norm_eps=float(getattr(self.model.norm, "eps", getattr(self.model.fc_norm, "eps", 1e-6))),
            data_config=self.data_config,
            temporal=self.temporal,
        )

    def train_transform(self) -> Any:
        """The augmented training transform: timm's random resized crop, flip and colour jitter at the eval size
        and normalisation (no AutoAugment or random erasing: small datasets and simple images suffer from them)."""
        dc = self.data_config
        return create_transform(
            input_size=dc["input_size"],
            is_training=True,
            interpolation=dc["interpolation"],
            mean=dc["mean"],
            std=dc["std"],
            scale=(0.5, 1.0),
            hflip=0.5,
            color_jitter=0.2,
        )

    def readout_tensors(self) -> dict[str, np.ndarray]:
        """The final norm (before pooling) and fc_norm (after pooling), frozen parts of every head."""
        return {**_layer_norm(self.model.norm, "norm"), **_layer_norm(self.model.fc_norm, "fc_norm")}

    @torch.no_grad()
    def intermediates(self, images: torch.Tensor, layers: list[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Block outputs (before the final norm) as [B, len(layers), T, D], prefix tokens first, in `dtype` (default:
        the forward's). Under no_grad, not inference_mode: `online` training feeds them to a side network that
        autograd must record. No autocast: the weights are in the forward's precision already."""
        with torch.autocast(self.device.type, enabled=False):  # a caller's autocast must not re-cast the weights
            out = self.model.forward_intermediates(
                images.to(self.device, self.dtype),
                indices=layers,
                norm=False,
                output_fmt="NLC",
                intermediates_only=True,
                return_prefix_tokens=True,
                stop_early=True,  # no block after the last asked
            )
        # One copy of each layer into its slot (converting on the way) instead of cat, stack and a cast: the three
        # passes over the activations cost about as much as writing them to the cache.
        # a ViT without prefix tokens (no class token) gives the spatial tokens alone, not (spatial, prefix) pairs
        out = [y if isinstance(y, tuple) else (y, y[:, :0]) for y in out]
        spatial, prefix = out[0]
        n_prefix = prefix.shape[1]
        batch, tokens, dim = spatial.shape[0], n_prefix + spatial.shape[1], spatial.shape[2]
        stacked = spatial.new_empty((batch, len(out), tokens, dim), dtype=dtype or spatial.dtype)
        for i, (spatial, prefix) in enumerate(out):
            stacked[:, i, :n_prefix] = prefix
            stacked[:, i, n_prefix:] = spatial
        return stacked


HUB_TIMEOUT_S = 3.0


def _weights_source(name: str) -> dict[str, Any]:
    """Where timm's pretrained weights for `name` come from: the Hugging Face cache if they are in it (loaded from the
    file, no request to the hub), else the hub if it answers within `HUB_TIMEOUT_S` (timm downloads them); else a
    BackboneError at once, where the hub's client would retry for most of a minute."""
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return {}  # weights from a URL or a file of timm's own: timm knows best
    repo, _, revision = hub_id.partition("@")
    filename = getattr(cfg, "hf_hub_filename", None)
    for candidate in [filename] if filename else ["model.safetensors", "pytorch_model.bin"]:
        cached = try_to_load_from_cache(repo, candidate, revision=revision or None)
        if isinstance(cached, str):
            return {"pretrained_cfg_overlay": {"file": cached}}
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=HUB_TIMEOUT_S).close()
    except OSError as e:
        raise BackboneError(
            f"cannot load pretrained weights for backbone {name!r}: they are not in the local cache "
            f"and the model hub ({endpoint.hostname}) is unreachable ({e}); give `backbone.checkpoint` "
            "(a safetensors file on the server) or `pretrained: false`"
        ) from None
    return {}


def _data_config(model: torch.nn.Module, image_size: int | None) -> DataConfig:
    """timm's data config of `model` (at `image_size`, if given), its tuples as lists: as JSON holds it."""
    config = resolve_data_config({}, model=model)
    if image_size is not None:
        config["input_size"] = (3, image_size, image_size)
    return cast(DataConfig, {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()})


def load_backbone(
    spec: BackboneSpec, device: str = "cpu", checkpoint: Path | None = None, precision: str | None = None
) -> Backbone:
    """Create the frozen backbone; `checkpoint` is the resolved path of `spec.checkpoint`, if any; `precision` of
    the frozen forward (default: `spec.precision`, `auto` resolved for the device). Methods that train inside the
    backbone take `model` in fp32 (`precision="fp32"`) and run it under autocast."""
    base = spec.name.split(".")[0]
    if not timm.is_model(base):
        raise BackboneError(f"unknown backbone {spec.name!r}: not a timm model name (see timm.list_models('vit*'))")
    kwargs: dict[str, Any] = {"num_classes": 0}
    if spec.image_size is not None:
        kwargs["img_size"] = spec.image_size
    pretrained = spec.pretrained and checkpoint is None
    if pretrained:
        kwargs.update(_weights_source(spec.name))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)  # pretrained=False models are reproducible, so caches are reused
            model = timm.create_model(spec.name, pretrained=pretrained, **kwargs)
    except Exception as e:
        what = "load pretrained weights for" if pretrained else "create"
        raise BackboneError(f"cannot {what} backbone {spec.name!r}: {type(e).__name__}: {e}") from e
    if not (hasattr(model, "forward_intermediates") and hasattr(model, "blocks") and hasattr(model, "patch_embed")):
        raise BackboneError(f"backbone {spec.name!r} is not a plain ViT (no blocks/forward_intermediates)")
    if checkpoint is not None:
        from safetensors.torch import load_file

        try:
            state = load_file(str(checkpoint))
        except Exception as e:
            raise BackboneError(f"checkpoint {checkpoint}: not a readable safetensors file ({e})") from e
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BackboneError(
                f"checkpoint {checkpoint} does not fit {spec.name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    model = modality_for(spec).wrap(model, spec.name)  # a ViViT for clips (services/video/backbone.py)
    model.eval().requires_grad_(False)
    data_config = _data_config(model, spec.image_size)
    transform = create_transform(**data_config, is_training=False)
    digest = weights_hash(model)  # of the fp32 weights (a ViViT's, inflated), whatever the forward's precision
    dev = torch.device(device)
    precision = resolve_precision(precision or spec.precision, dev)
    return Backbone(spec, model.to(dev, PRECISIONS[precision]), dev, data_config, digest, transform, precision)
