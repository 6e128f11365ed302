"""Per-key quotas as submission and the job steps apply them; the errors are storage/quotas.py's, the counters
storage/redis/usage.py's.

- Jobs queued or running (SIDETUNE_KEY_QUOTA_JOBS): checked by the job store as it records the job (429).
- Models (SIDETUNE_KEY_QUOTA_ARTIFACTS_GB): a key whose models reached the quota is refused at submission, and its
  job fails before training if they reached it meanwhile (a model's size is known only once it is written).
- Feature cache (SIDETUNE_KEY_QUOTA_CACHE_GB): an entry counts against the key whose job created it (keys that reuse
  it are recorded as its users, not charged). At submission a job whose new entry cannot fit is refused; before
  extracting, the job records its key as the entry's creator with the bytes planned, then evicts that key's own least
  recently used entries (never another key's, never one in use) until the key's entries fit, and fails if they cannot.
  The operator's SIDETUNE_CACHE_QUOTA_GB stays a global least-recently-used policy over every key's entries.
Uploads (SIDETUNE_KEY_QUOTA_UPLOADS_GB) are reserved by the upload route (api/routes/datasets.py).
"""

from __future__ import annotations

import logging
from typing import Any

from services.jobs.plan import Plan
from services.jobs.progress import Reporter
from storage.cache import FeatureCache
from storage.quotas import ARTIFACTS, GB, QuotaExceeded, human, owner_key
from storage.redis import JobStore
from storage.settings import Settings

log = logging.getLogger("sidetune.pipeline")

CACHE_SETTING = "SIDETUNE_KEY_QUOTA_CACHE_GB"
ARTIFACTS_SETTING = "SIDETUNE_KEY_QUOTA_ARTIFACTS_GB"
SMALLER = (
    "cache less (extraction.layers, extraction.tokens or a lossy codec; POST /jobs?dry_run=true gives the "
    "size), train without a cache (execution.mode), or ask the operator for a larger quota or to remove entries "
    "this key no longer needs"
)


def check_models(store: JobStore, settings: Settings, owner: str | None) -> None:
    store.usage.check(owner, ARTIFACTS, settings.key_quota_artifacts_gb, ARTIFACTS_SETTING)


def check_submission(plan: Plan, settings: Settings, store: JobStore, owner: str | None) -> None:
    """Refuse (QuotaExceeded) a job whose key's models reached their quota, or whose new cache entry cannot fit the
    key's cache quota even after every complete entry of the key is evicted."""
    check_models(store, settings, owner)
    if settings.key_quota_cache_gb is None or not plan.needs_cache or plan.expected_cache_bytes is None:
        return
    limit = round(settings.key_quota_cache_gb * GB)
    used, evictable = FeatureCache(settings.cache_location).owner_bytes(owner_key(owner))
    if plan.expected_cache_bytes > limit - (used - evictable):
        raise QuotaExceeded(
            "feature cache",
            f"{human(used)} in use ({human(evictable)} of it evictable)",
            human(limit),
            CACHE_SETTING,
            need=human(plan.expected_cache_bytes),
            remedy=SMALLER,
        )


def fit_cache(store: JobStore, settings: Settings, prep: Any, owner: str | None, reporter: Reporter) -> None:
    """Before extracting the entry `prep` names (under its lock): record the job's key as its creator, then make the
    key's entries fit its quota by evicting its own least recently used ones; QuotaExceeded if they cannot."""
    from services.extraction import planned_bytes

    who = owner_key(owner)
    claimed = prep.entry.claim(who, planned_bytes(prep))
    if settings.key_quota_cache_gb is None:
        return
    limit = round(settings.key_quota_cache_gb * GB)
    cache = FeatureCache(settings.cache_location)
    used, evictable = cache.owner_bytes(who)  # this job's entry included, at its planned size
    if used - evictable <= limit:  # else evicting would not make it fit: evict nothing
        evicted = cache.evict(limit, keep={prep.key}, guard=store.pins(), owner=who)
        if evicted:
            reporter.event(
                f"evicted {len(evicted)} of this key's least recently used cache entries to stay under {CACHE_SETTING}"
            )
        used, _ = cache.owner_bytes(who)
    if used > limit:
        if claimed and not prep.entry.exists:  # nothing written: the claim must not count against the key
            cache.remove(prep.key)
        raise QuotaExceeded(
            "feature cache", f"{human(used)} in use with this job's entry", human(limit), CACHE_SETTING, remedy=SMALLER
        )


def use_cache(prep: Any, owner: str | None) -> None:
    """Record the job's key as a user of an entry it reuses (it is not charged for it). Best effort: a full disk or a
    store that blinks here costs the record, never the job."""
    try:
        prep.entry.use(owner_key(owner))
    except OSError as e:
        log.warning("could not record %s as a user of cache entry %s: %s", owner_key(owner), prep.key, e)
