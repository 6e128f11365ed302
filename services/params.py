"""Trainable parameter counts of a method on a backbone, without weights or memory: the timm model and the
method are built on the meta device, so even ViT-g costs nothing. Counts follow the papers' convention
(classifier excluded); `scalars` says how many of them are single-number parameters (e.g. LoSA's per-layer
scales), which some papers leave out of their tables.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from pydantic import BaseModel, JsonValue, ValidationError

from services import methods
from services.errors import BackboneError
from services.modality import modality_for
from services.video.spec import VideoSpec


@dataclass(frozen=True)
class ParamCount:
    backbone: str
    method: str
    config: dict[str, JsonValue]  # the validated method config, defaults included
    num_layers: int
    tokens: int
    dim: int
    side: int  # trainable parameters, classifier excluded
    scalars: int  # of `side`, the parameters that are a single number
    classifier: int  # trainable parameters of the classifier
    backbone_params: int  # parameters of the backbone as created (no head)
    total: int  # every parameter of the model as trained: backbone, method and classifier


def _config(method: str, options: dict[str, JsonValue]) -> BaseModel:
    if method not in methods.CONFIGS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(methods.METHOD_NAMES)}")
    if "name" in options:
        raise ValueError("the method name is not an option")
    cls = methods.CONFIGS[method]
    try:
        return cls.model_validate({"name": method, **options})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'options'}: {err['msg']}" for err in e.errors())
        accepted = ", ".join(f for f in cls.model_fields if f != "name") or "none"
        raise ValueError(f"invalid option for method {method!r}: {problems} (its options: {accepted})") from None


def _backbone(name: str, image_size: int | None):
    import timm
    import torch

    if not timm.is_model(name.split(".")[0]):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models('vit*')"
        raise ValueError(f"unknown backbone {name!r}: not a timm model name; {hint}")
    kwargs: dict[str, int] = {"num_classes": 0}
    if image_size is not None:
        kwargs["img_size"] = image_size
    try:
        with torch.device("meta"):
            vit = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:
        raise ValueError(f"cannot create backbone {name!r}: {type(e).__name__}: {e}") from e
    if not all(hasattr(vit, a) for a in ("blocks", "patch_embed", "embed_dim", "num_prefix_tokens")):
        raise ValueError(f"backbone {name!r} is not a plain ViT (no blocks/patch_embed)")
    return vit


def count_parameters(
    backbone: str,
    method: str,
    options: dict[str, JsonValue],
    image_size: int | None = None,
    tail_blocks: int | None = None,
    num_classes: int = 10,
    video: VideoSpec | None = None,
) -> ParamCount:
    """Count `method` (configured by `options`, the config's fields but `name`) on timm `backbone`, or with
    `video` (`backbone.video`) on the ViViT made of it.

    `tail_blocks` adapts only the last k blocks (methods with a `tail` mode). Raises ValueError, naming the
    cause, for an unknown backbone or method, an invalid option, or a method that cannot be built that way.
    """
    import torch

    from services.methods.readout import FeatureInfo

    config = _config(method, options)
    if tail_blocks is not None and "tail" not in config.modes:
        raise ValueError(f"method {method!r} has no tail mode (its modes: {', '.join(config.modes)})")
    try:
        vit = modality_for(video).wrap(_backbone(backbone, image_size), backbone)  # a ViViT for clips
    except BackboneError as e:
        raise ValueError(str(e)) from None
    backbone_params = sum(p.numel() for p in vit.parameters())
    num_layers, dim = len(vit.blocks), vit.embed_dim
    tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
    temporal = getattr(vit.patch_embed, "temporal", None)
    with torch.device("meta"):
        if config.kind == "side":
            norm_eps = float(getattr(vit.norm, "eps", getattr(vit.fc_norm, "eps", 1e-6)))
            info = FeatureInfo(
                num_layers=num_layers,
                tokens=tokens,
                dim=dim,
                num_prefix_tokens=vit.num_prefix_tokens,
                global_pool=vit.global_pool,
                norm_eps=norm_eps,
                num_classes=num_classes,
                readout={},
                temporal=temporal,
            )
            model = methods.build(config, info)
        else:
            model = methods.build(config, vit, num_classes, tail_blocks)
    head = {id(p) for p in model.head.parameters()}
    side = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
    total = sum(p.numel() for p in model.parameters()) + (backbone_params if config.kind == "side" else 0)
    return ParamCount(
        backbone=backbone,
        method=method,
        config=config.model_dump(mode="json", exclude={"name"}),
        num_layers=num_layers,
        tokens=tokens,
        dim=dim,
        side=sum(p.numel() for p in side),
        scalars=sum(1 for p in side if p.numel() == 1),
        classifier=sum(p.numel() for p in model.head.parameters() if p.requires_grad),
        backbone_params=backbone_params,
        total=total,
    )
