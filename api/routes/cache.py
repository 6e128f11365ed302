"""The feature cache, for operators (`AdminDep`: a key from SIDETUNE_ADMIN_KEYS): list its entries with their size,
completeness, last use and the jobs using them, and delete one that no job uses (eviction does this by itself under
the quota and the free disk; this is for an operator who wants the space now, or a partial entry gone)."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Path, Response

from api.deps import AdminDep, SettingsDep, StoreDep
from api.errors import ApiError
from api.schemas import CacheList, ErrorBody
from storage.cache import CacheEntry, FeatureCache
from storage.redis.locks import Pins

router = APIRouter(prefix="/cache", tags=["cache"], responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}})

KEY = re.compile(r"[0-9a-f]{32}/[0-9a-f]{32}")  # storage.cache.cache_key's family/variant
CacheKey = Annotated[str, Path(description="The entry's key, `<family>/<variant>`, as `GET /cache` lists it.")]


def _info(entry: CacheEntry, pins: Pins) -> dict:
    try:
        complete = entry.is_complete
        meta = entry.meta if complete else {}
    except Exception:  # arrays left without metadata by a crash, or removed meanwhile
        complete, meta = False, {}
    shown = {k: meta[k] for k in ("backbone", "layers", "token_mode", "shape", "codec") if k in meta}
    return {
        "key": entry.key,
        "bytes": entry.nbytes(),
        "complete": complete,
        "last_used": entry.last_used or None,
        "pinned_by": pins.holders(entry.key),
        "extracting": pins.extracting(entry.key),
        "meta": shown,
    }


@router.get("", response_model=CacheList)
def list_cache(_: AdminDep, settings: SettingsDep, store: StoreDep) -> dict:
    """Every entry of the feature cache, least recently used first, with the jobs reading (`pinned_by`) or writing
    (`extracting`) it; the cache's total, quota and free disk."""
    cache = FeatureCache(settings.cache_location)
    pins = store.pins()
    data = sorted((_info(e, pins) for e in cache.entries()), key=lambda d: (d["last_used"] or 0.0, d["key"]))
    quota = None if settings.cache_quota_gb is None else int(settings.cache_quota_gb * 1e9)
    return {
        "object": "list",
        "data": data,
        "bytes": sum(d["bytes"] for d in data),
        "quota_bytes": quota,
        "free_disk_bytes": cache.free_bytes(),
    }


@router.delete("/{key:path}", status_code=204, responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}})
def delete_cache_entry(key: CacheKey, _: AdminDep, settings: SettingsDep, store: StoreDep) -> Response:
    """Delete one entry, complete or not. Refused with 409 `cache_in_use` while a job reads or writes it; 404 for a
    key that is no entry."""
    if not KEY.fullmatch(key):
        raise ApiError(404, "not_found", f"no cache entry {key!r} (keys look like <32 hex>/<32 hex>)")
    cache = FeatureCache(settings.cache_location)
    pins = store.pins()
    if not cache.fs.isdir(cache.entry(key).root):
        raise ApiError(404, "not_found", f"no cache entry {key!r}")
    users = pins.holders(key) + [j for j in [pins.extracting(key)] if j]
    if users or not cache.discard(key, pins):
        raise ApiError(
            409,
            "cache_in_use",
            f"cache entry {key!r} is in use by {', '.join(users) or 'a job'}; delete it once they have ended",
        )
    return Response(status_code=204)
