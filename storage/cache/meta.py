"""What a cache entry records about itself, typed: the parts of its key (`KeyFamily`, `KeyVariant`), its metadata
(`EntryMeta`: what the extractor describes, `EntryDescription`, and the layout `CacheEntry.create` adds), its summary
once complete (`EntrySummary`) and its creator (`Creator`, owner.json). The JSON they are stays as entries already on
disk hold it; keys that older entries lack are NotRequired (or the whole TypedDict total=False).

`DataConfig` is timm's data config of a backbone as JSON holds it: the preprocessing a cache key and a model's
manifest (services/models/manifest.py) name. typing_extensions' TypedDict and no `from __future__ import
annotations`, so that pydantic validates them and NotRequired is seen at run time.
"""

from typing import Literal, NotRequired

from typing_extensions import TypedDict

from storage.specs import VideoRecord


class DataConfig(TypedDict):
    """timm's data config of a backbone (`timm.data.resolve_data_config`), as `create_transform(**...)` takes it."""

    input_size: list[int]  # (channels, height, width)
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: list[float]
    std: list[float]


class KeyPreprocessing(DataConfig):
    """How an image becomes the backbone's input, as the cache key names it (services/extraction.py)."""

    decode: Literal["cpu", "device"]
    pixels: str  # the version of the decoding rules (services/data/images.py: PIXELS)
    video: NotRequired[VideoRecord]  # a video backbone's frames, tubelet and init


class KeyFamily(TypedDict):
    """What makes the same activations: a family of entries (the first half of a key)."""

    dataset: str  # the dataset's fingerprint
    backbone: str
    weights: str  # the hash of the backbone's weights
    preprocessing: KeyPreprocessing
    precision: str


class KeyVariant(TypedDict):
    """What one entry of a family holds, and how (the second half of a key)."""

    layers: list[int]
    tokens: str
    dtype: str
    rows: int  # rows per batch (a shard)
    codec: str
    keepbits: int | None


class EntryDescription(TypedDict, total=False):
    """What the extractor records of the backbone and the dataset (services/backbones.py: `Backbone.info`, and
    services/extraction.py); the cache itself needs none of it."""

    backbone: str
    weights_hash: str
    precision: str
    num_layers: int
    tokens: int  # the backbone's tokens per image, prefix tokens included
    dim: int
    num_prefix_tokens: int
    global_pool: str
    norm_eps: float
    data_config: DataConfig
    temporal: int | None  # a ViViT's temporal positions; None for an image backbone
    dataset_root: str
    dataset_fingerprint: str
    classes: list[str]
    skipped_rows: list[str]  # the first notes on the dataset's rows left out (every one, in older entries)
    left_out: dict[str, int]  # how many rows of each kind were left out (services/data/formats/left_out.py)


class EntryMeta(EntryDescription):
    """An entry's `meta` attribute: the description, and the layout `CacheEntry.create` writes with it."""

    shape: list[int]  # [images, cached blocks, stored tokens, dim]
    layers: list[int]
    token_mode: Literal["all", "cls", "mean"]
    batch_size: int
    chunk_rows: NotRequired[int]  # rows per chunk; older entries chunk by batch
    codec: str
    keepbits: int | None


class EntrySummary(TypedDict, total=False):
    """An entry's `summary` attribute, written as it is marked complete (services/extraction.py); {} before."""

    skipped: list[str]  # the files that could not be decoded
    bytes: int
    bytes_per_image: int


class Creator(TypedDict, total=False):
    """owner.json: the key whose job created the entry and the bytes it planned; {} for an entry made before owners
    were recorded."""

    owner: str
    planned_bytes: int
