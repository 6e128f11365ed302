"""Per-key quotas: what one API key may hold at once, and the typed errors a refusal raises.

Jobs queued or running are counted by the job store (storage/jobs.py: a sorted set of each key's unfinished jobs,
checked and written in one Lua script with the job's record). Bytes of uploaded datasets and of models are counters
per key in Redis (`usage:<owner>`), reserved here by a Lua script that checks and adds in one step, so concurrent
uploads never pass a quota together; they are given back when the record goes. Feature cache bytes are read from the
cache entries themselves (storage/cache: each records the key that created it). Knows nothing of HTTP:
services/errors.py maps QuotaExceeded to 409 `quota_exceeded` and TooManyJobs to 429 `too_many_jobs`.
"""

from __future__ import annotations

import redis

GB = 10**9
UPLOADS, ARTIFACTS = "uploads", "artifacts"

# KEYS[1] the usage hash; ARGV: field, bytes to add, limit (-1: none). Returns {admitted 0/1, usage after (or now)}.
_RESERVE = """
local used = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local add, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
if limit >= 0 and used + add > limit then return {0, used} end
return {1, redis.call('HINCRBY', KEYS[1], ARGV[1], add)}
"""


def owner_key(owner: str | None) -> str:
    """How an owner is named in Redis keys and cache entries: its id, or `-` for the open API (no keys)."""
    return owner or "-"


def human(nbytes: float) -> str:
    """Decimal units, as the settings' GB are."""
    if nbytes >= 10**9:
        return f"{nbytes / 10**9:.2f} GB"
    return f"{nbytes / 10**6:.1f} MB" if nbytes >= 10**6 else f"{int(nbytes):,} bytes"


class QuotaExceeded(Exception):
    """A key's quota would be passed. The message names the quota, the key's usage, what the request needs and the
    setting; `retry_after_s` says when a retry may succeed (None: only freeing something helps)."""

    retry_after_s: int | None = None

    def __init__(
        self, quota: str, usage: str, limit: str, setting: str, need: str | None = None, remedy: str = ""
    ) -> None:
        self.quota, self.setting = quota, setting
        needs = f"; this needs {need}" if need else ""
        super().__init__(
            f"{quota} quota of this API key exceeded: {usage} of at most {limit} ({setting}){needs}"
            + (f"; {remedy}" if remedy else "")
        )


class TooManyJobs(QuotaExceeded):
    """A key with as many jobs queued or running as its quota allows: a retry succeeds once one of them ends."""

    retry_after_s = 30

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(
            "jobs",
            f"{active} jobs queued or running",
            f"{limit}",
            "SIDETUNE_KEY_QUOTA_JOBS",
            remedy="retry once one of them has finished, or cancel one",
        )


class Usage:
    """Byte counters per key: uploaded datasets and models."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._reserve = client.register_script(_RESERVE)

    def get(self, owner: str | None, kind: str) -> int:
        return int(self.r.hget(f"usage:{owner_key(owner)}", kind) or 0)

    def reserve(self, owner: str | None, kind: str, nbytes: int, limit_gb: float | None, setting: str) -> None:
        """Add `nbytes` to the key's `kind` usage, atomically refusing (QuotaExceeded) if that passes `limit_gb`."""
        limit = -1 if limit_gb is None else round(limit_gb * GB)
        ok, used = self._reserve(keys=[f"usage:{owner_key(owner)}"], args=[kind, int(nbytes), limit])
        if not ok:
            raise _refusal(kind, used, limit, setting, need=nbytes)

    def add(self, owner: str | None, kind: str, nbytes: int) -> None:
        """Count `nbytes` (negative: give them back) without a check."""
        self.r.hincrby(f"usage:{owner_key(owner)}", kind, int(nbytes))

    def check(self, owner: str | None, kind: str, limit_gb: float | None, setting: str) -> None:
        """Refuse (QuotaExceeded) if the key's `kind` usage has reached `limit_gb` already (for what is not yet
        there to be counted: the model a job will write)."""
        if limit_gb is not None and (used := self.get(owner, kind)) >= round(limit_gb * GB):
            raise _refusal(kind, used, round(limit_gb * GB), setting)


def _refusal(kind: str, used: int, limit: int, setting: str, need: int | None = None) -> QuotaExceeded:
    what = {UPLOADS: "uploaded datasets", ARTIFACTS: "models"}[kind]
    needs = None if need is None else human(need)
    return QuotaExceeded(
        what, f"{human(used)} in use", human(limit), setting, need=needs, remedy=f"delete some of this key's {what}"
    )
