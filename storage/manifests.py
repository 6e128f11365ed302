"""A trained model's `config.json` as the artifact store holds it (storage/artifacts.py), of each version: the JSON of
`services.models.manifest.Manifest` (`ManifestRecord`, version 2) and the plain dict written before manifests existed
(`ManifestV1Record`, no `version`). `services/models/manifest.py: migrate` reads either into a `Manifest`.

As storage/specs.py, TypedDicts of the dumped form (storage never imports services); `tests/storage/test_specs.py`
checks them against the models. No `from __future__ import annotations`, so that pydantic validates them.
"""

from typing import Literal

from typing_extensions import TypedDict

from storage.cache.meta import DataConfig
from storage.specs import BackboneSpecRecord, MethodRecord

TokenMode = Literal["all", "cls", "mean"]


class FeaturesRecord(TypedDict):
    """`features` (Manifest's `Features`): the backbone's activations as training read them."""

    num_layers: int
    dim: int
    tokens: int
    num_prefix_tokens: int
    global_pool: str
    norm_eps: float
    temporal: int | None
    token_mode: TokenMode


class ManifestRecord(TypedDict):
    """config.json, version 2: `Manifest.to_dict()`."""

    version: Literal[2]
    method: MethodRecord
    kind: Literal["side", "adapted"]
    mode: Literal["cache", "images", "tail", "online"]
    tail_blocks: int | None
    backbone: BackboneSpecRecord
    weights_hash: str
    preprocessing: DataConfig
    features: FeaturesRecord
    input_layers: list[int] | None
    input_tokens: TokenMode | None
    classes: list[str]
    multi_label: bool
    threshold: float | None
    # services.spec.Hyperparameters dumped: a record of scalars, kept in the keys of the version that wrote it
    hyperparameters: dict[str, float | int | str | bool | None]
    cache_key: str | None


class FeaturesV1Record(TypedDict, total=False):
    """`feature_info` of a version 1 config: `features` and the class count; the oldest lack `token_mode` (`all`)."""

    num_layers: int
    dim: int
    tokens: int
    num_prefix_tokens: int
    global_pool: str
    norm_eps: float
    temporal: int | None
    token_mode: TokenMode
    num_classes: int


class ManifestV1Record(TypedDict, total=False):
    """config.json, version 1 (no `version`): the keys its readers read; the older the artifact, the fewer it has."""

    method: MethodRecord
    kind: Literal["side", "adapted"]
    mode: Literal["cache", "images", "tail", "online"]
    tail_blocks: int | None
    backbone: BackboneSpecRecord
    weights_hash: str
    data_config: DataConfig
    feature_info: FeaturesV1Record
    input_layers: list[int] | None
    input_tokens: TokenMode | None
    classes: list[str]
    multi_label: bool
    threshold: float | None
    hyperparameters: dict[str, float | int | str | bool | None] | None
    cache_key: str | None
