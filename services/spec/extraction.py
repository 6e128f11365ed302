"""`extraction` of a job spec: what the feature cache holds (blocks, tokens, codec) and how extraction is split."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.errors import SpecError


class EveryKth(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every: int = Field(..., ge=1, description="Cache every k-th block, ending at the last one.")


class LastK(BaseModel):
    model_config = ConfigDict(extra="forbid")
    last: int = Field(..., ge=1, description="Cache the last k blocks.")


LayerChoice = Literal["auto", "all"] | EveryKth | LastK | list[Annotated[int, Field(ge=0)]]


def select_cached_layers(choice: LayerChoice, num_layers: int) -> list[int]:
    """The 0-based blocks a layer choice names (`auto` is resolved by the caller from the method's needs)."""
    if choice == "all":
        return list(range(num_layers))
    if isinstance(choice, EveryKth):
        return sorted(range(num_layers - 1, -1, -choice.every))
    if isinstance(choice, LastK):
        return list(range(max(0, num_layers - choice.last), num_layers))
    if isinstance(choice, list):
        bad = [i for i in choice if i >= num_layers]
        if bad:
            raise SpecError(f"extraction.layers {bad} do not exist: the backbone has {num_layers} blocks")
        return sorted(set(choice))
    raise SpecError(f"cannot select layers from {choice!r}")


class ExtractionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = Field(
        "auto",
        description="Images (or clips) per backbone forward; also the rows of one cache shard (write unit). `auto`: "
        "32 images; for clips, as many as fit a shard of about 128 MB of activations (1 to 32: a ViViT-B of 16 "
        "frames caching every layer takes 28.9 MB a clip, so 4).",
    )
    layers: LayerChoice = Field(
        "auto",
        description="Which blocks' outputs are cached: `auto` (what the method needs: the last block for linear, "
        'the side layers for losa, the input of the adapted blocks in tail mode), `all`, `{"every": k}`, '
        '`{"last": k}`, or a list of 0-based block indices. Fewer layers: a smaller cache, fewer later jobs '
        "that can reuse it.",
    )
    tokens: Literal["auto", "all", "cls", "mean"] = Field(
        "auto",
        description="Which tokens are cached per layer: `all` (needed by losa and tail mode; T x D per layer), "
        "`cls` (the class token only, 1 x D: exact for a linear probe on a class-token backbone) or `mean` (the "
        "mean of the patch tokens, 1 x D; a linear probe then normalises the mean rather than averaging normalised "
        "tokens). `auto`: `all` when the method needs it, else the pooled token the linear probe reads.",
    )
    codec: Literal["none", "zstd", "blosc"] = Field(
        "none", description="Lossless compression of the cached activations (blosc: zstd with bit shuffling)."
    )
    shards: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        "auto",
        description="Split the extraction into this many shard tasks, which extract workers on any machine run in "
        "parallel, each writing its own cache shards. `auto`: one per live extract worker.",
    )
    decode: Literal["cpu", "device"] = Field(
        "cpu",
        description="Where images are decoded and resized. `cpu`: Pillow in the loader processes (the backbone's "
        "own eval transform, exactly). `device`: JPEG files decoded on the GPU (nvJPEG, batched) and every image "
        "resized there by torchvision (other formats decoded by Pillow first); for loaders that cannot keep up "
        "with the GPU. A different preprocessing (pixels differ slightly), so a cache entry of its own.",
    )
    keepbits: int | None = Field(
        None,
        ge=1,
        le=10,
        description="Lossy: round float16 mantissas to this many bits (numcodecs BitRound, of 10) before the codec; "
        "fewer bits compress better at some cost in accuracy (see bench/cache.py). None: exact.",
    )
