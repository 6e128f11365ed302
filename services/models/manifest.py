"""The manifest of a trained model: everything that rebuilds it from its trained weights (the method and its
configuration, the backbone and the hash of its weights, the preprocessing, the activations a side network reads)
and what its outputs mean (classes, multi-label threshold). Typed and torch-free, so the API reads it.

It is the artifact's `config.json`, next to `weights.safetensors` (storage/artifacts.py): training builds it
(services/training/job.py) and `services/models/loading.py: load_trained` rebuilds the model from the two, as PEFT's
`PeftConfig.save_pretrained`/`from_pretrained` round-trips an adapter's config next to its weights and nanoGPT saves
the `model_args` that rebuild its module with the checkpoint.

Versions: 1 is the plain dict written before manifests existed (no `version` key: `data_config`, `feature_info`),
2 is `Manifest`. Every reader goes through `migrate`, so the artifacts of every version load; a new layout bumps
`VERSION` and adds its step to `migrate`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.errors import UserError
from services.methods import CONFIGS
from services.modality import modality_for
from services.spec import BackboneSpec, Mode
from services.video.spec import VideoSpec
from storage.cache.meta import DataConfig
from storage.manifests import FeaturesRecord, ManifestRecord, ManifestV1Record

VERSION = 2
CONFIG_NAME = "config.json"  # the manifest's file in a model's artifact folder

# the configuration of a method that trains a model (`auto` chooses one of them and is never a model's method)
TrainedMethod = Annotated[Union[tuple(CONFIGS.values())], Field(discriminator="name")]  # noqa: UP007
Tokens = Literal["all", "cls", "mean"]


class BackboneChanged(UserError, ValueError):
    """The backbone a model runs on has other weights than it was trained on (its checkpoint file replaced, timm's
    pretrained weights changed): the model is never run on them. The one error of every loader (serving, export,
    adapters)."""

    code = "backbone_changed"
    status = 409


class Preprocessing(BaseModel):
    """How an image (each frame of a clip alike) becomes the backbone's input: timm's data config of the backbone,
    as `timm.data.create_transform(**preprocessing.data_config())` takes it."""

    model_config = ConfigDict(extra="forbid")

    input_size: tuple[int, int, int] = Field(..., description="(channels, height, width) of the input.")
    interpolation: str = Field(..., description="Resampling of the resize, e.g. `bicubic`.")
    crop_pct: float = Field(0.875, description="The resize makes the crop this fraction of the image.")
    crop_mode: str = Field("center", description="timm's crop mode, e.g. `center`.")
    mean: tuple[float, ...] = Field(..., description="Per-channel mean subtracted after scaling to [0, 1].")
    std: tuple[float, ...] = Field(..., description="Per-channel standard deviation divided by, after the mean.")

    def data_config(self) -> DataConfig:
        """As timm's data config (lists, as services/backbones.py holds it)."""
        return self.model_dump(mode="json")


class Features(BaseModel):
    """The backbone's activations as the model read them in training: what a side network's readout is built for."""

    model_config = ConfigDict(extra="forbid")

    num_layers: int = Field(..., description="Blocks of the backbone.")
    dim: int = Field(..., description="Width of a token.")
    tokens: int = Field(..., description="Tokens per layer as read: every token (prefix first), or 1 when pooled.")
    num_prefix_tokens: int = Field(..., description="Class and register tokens ahead of the patch tokens.")
    global_pool: str = Field(
        ..., description="The pooling of the backbone's own head (`token`: the class token; `avg`)."
    )
    norm_eps: float = Field(..., description="Epsilon of the backbone's final norm, which the readout applies.")
    temporal: int | None = Field(None, description="Video: temporal positions T' of the token grid; None for images.")
    token_mode: Tokens = Field("all", description="The tokens the activations held: `all`, or pooled (`cls`, `mean`).")


class Manifest(BaseModel):
    """A trained model's `config.json`: read it with `migrate` (or `Manifest.from_artifact`), write it with
    `to_dict`."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[2] = Field(VERSION, description="Layout of this manifest (1: the plain dict before it).")
    method: TrainedMethod = Field(..., description="The method and its configuration (services/methods/<name>).")
    kind: Literal["side", "adapted"] = Field(
        ...,
        description="`side`: a side network on the backbone's activations (linear, LoSA); `adapted`: the method "
        "changed the backbone (APLA, ARC, LoRA, full) and is merged into it.",
    )
    mode: Mode = Field(..., description="The execution mode it was trained in (cache, online, images, tail).")
    tail_blocks: int | None = Field(None, description="`tail` mode: the last k blocks were adapted; else None.")
    backbone: BackboneSpec = Field(
        ...,
        description="The frozen backbone as the job named it: timm name, pretrained weights or a checkpoint file, "
        "random init seed, image size, precision, and `video` (frames, tubelet, sampling; None for images).",
    )
    weights_hash: str = Field(..., description="Hash of the backbone's float32 weights the model was trained on.")
    preprocessing: Preprocessing = Field(..., description="Resize, crop and normalisation of its inputs.")
    features: Features = Field(..., description="The activations of the backbone as training read them.")
    input_layers: list[int] | None = Field(None, description="Side networks: the blocks they read; else None.")
    input_tokens: Tokens | None = Field(
        None, description="Side networks: the tokens of each block they read (`all`, or pooled); else None."
    )
    classes: list[str] = Field(..., description="Class names (tags, multi-label), in the order of the outputs.")
    multi_label: bool = Field(False, description="Multi-label: a sigmoid per tag, not a softmax over the classes.")
    threshold: float | None = Field(
        None, description="Multi-label: the score from which a tag is predicted (chosen on validation); else None."
    )
    # a record of scalars kept as written (services.spec.Hyperparameters dumped, in the keys of its version)
    hyperparameters: dict[str, float | int | str | bool | None] = Field(  # storage/manifests.py
        default_factory=dict, description="The training settings of the selected model, as resolved (a record)."
    )
    cache_key: str | None = Field(None, description="The feature cache entry it trained from, if any (a record).")

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if type(self.method).kind != self.kind:
            raise ValueError(f"method {self.method.name} is of kind {type(self.method).kind}, not {self.kind}")
        if self.kind == "side" and (self.input_layers is None or self.input_tokens is None):
            raise ValueError("a side network's manifest names its input_layers and input_tokens")
        return self

    @property
    def video(self) -> VideoSpec | None:
        """The clips a video model takes (None: images)."""
        return self.backbone.video

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one input: 3 x frames channels for a clip (frames stacked along them)."""
        _, h, w = self.preprocessing.input_size
        return modality_for(self).channels, h, w

    def to_dict(self) -> ManifestRecord:
        """As `config.json` holds it (JSON types)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_artifact(cls, artifacts: Any, model_id: str) -> Manifest:
        """The manifest of a complete model of `artifacts` (storage.artifacts.ArtifactStore), of any version."""
        return migrate(artifacts.read_json(model_id, CONFIG_NAME))


def _from_v1(config: ManifestV1Record) -> ManifestRecord:
    """Version 1 (no `version`): the defaults its readers applied to keys that older artifacts lack, `data_config`
    as `preprocessing`, `feature_info` as `features` (its class count is the classes')."""
    kind = config.get("kind", "side")
    side = kind == "side"
    # every key but the class count, as it is (Features refuses one it does not know; `token_mode`, which the oldest
    # lack, defaults to `all`)
    features = FeaturesRecord(**{k: v for k, v in config["feature_info"].items() if k != "num_classes"})
    return {
        "version": 2,
        "method": config["method"],
        "kind": kind,
        "mode": config.get("mode", "cache" if side else "images"),
        "tail_blocks": config.get("tail_blocks"),
        "backbone": config["backbone"],
        "weights_hash": config["weights_hash"],
        "preprocessing": config["data_config"],
        "features": features,
        "input_layers": config.get("input_layers") if side else None,
        "input_tokens": (config.get("input_tokens") or "all") if side else None,
        "classes": config["classes"],
        "multi_label": config.get("multi_label", False),
        "threshold": config.get("threshold"),
        "hyperparameters": config.get("hyperparameters") or {},
        "cache_key": config.get("cache_key"),
    }


def migrate(config: ManifestRecord | ManifestV1Record) -> Manifest:
    """The manifest of a model's `config.json` of any version (ValueError for a layout newer than this code)."""
    version = config.get("version", 1)
    if version == 1:
        config = _from_v1(config)
    elif version != VERSION:
        raise ValueError(f"the model's manifest is version {version}; this sidetune reads versions 1 to {VERSION}")
    return Manifest.model_validate(config)
