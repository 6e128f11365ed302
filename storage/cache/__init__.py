"""The feature cache: activations of a frozen backbone's blocks, one Zarr v3 group per cache entry.

Entries are grouped by family, `<cache_dir>/<family>/<variant>/`: a family is one (dataset, backbone, weights,
preprocessing); its variants differ in what they hold (which layers, which tokens) and how (codec, shard rows).
A job reuses any complete variant of its family that covers what it reads, so a linear probe after a LoSA job
on the same data runs no backbone forward. Layout of one entry:
    features.zarr/   acts [N, L', T', D] float16 for the cached blocks `meta.layers` (L' of them) and tokens
                     `meta.token_mode` (`all`: T' = every token; `cls`, `mean`: T' = 1). Sharded: one shard = one
                     extraction batch x all cached layers (the write unit, written whole); inside it, chunks of
                     about 1 MiB x one layer (the read unit, so a reader of one layer decodes only that layer).
                     labels [N] int64, valid [N] bool (False: undecodable image), batch_done [n_batches] bool
                     (one chunk each, so distinct writers never touch the same chunk); attrs: meta, then
                     `summary` and `complete` last.
    readout.safetensors  the backbone's final norm(s), needed to turn a cached last layer into features.
    last_used        touched by every reader (least-recently-used eviction).
    owner.json       the API key (its owner id) whose job created the entry, and the bytes it planned: the entry counts
                     against that key's quota (storage/quotas.py).
    users/<owner>    an empty file per key whose jobs used the entry.

The interface speaks numpy and hides zarr: callers never import zarr. Arrays are opened inside the
calling process and never kept across a fork (zarr runs an asyncio loop in a background thread).
"""

from storage.cache.collection import EvictionGuard, FeatureCache
from storage.cache.entry import (
    CHUNK_BYTES,
    CODECS,
    TOKEN_MODES,
    CacheEntry,
    CacheError,
    _rows_per_chunk,
    cache_key,
    pool_tokens,
)

__all__ = [
    "CHUNK_BYTES",
    "CODECS",
    "TOKEN_MODES",
    "CacheEntry",
    "CacheError",
    "EvictionGuard",
    "FeatureCache",
    "_rows_per_chunk",
    "cache_key",
    "pool_tokens",
]
