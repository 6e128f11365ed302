"""Per-key quotas: what one API key may hold at once, and the typed errors a refusal raises.

Jobs queued or running are counted by the job store (storage/redis/jobs.py: a sorted set of each key's unfinished
jobs, checked and written in one Lua script with the job's record). Bytes of uploaded datasets and of models are
counters per key in Redis (storage/redis/usage.py), reserved by a Lua script that checks and adds in one step, so
concurrent uploads never pass a quota together; they are given back when the record goes. Feature cache bytes are
read from the cache entries themselves (storage/cache: each records the key that created it). Knows nothing of HTTP:
services/errors.py maps QuotaExceeded to 409 `quota_exceeded` and TooManyJobs to 429 `too_many_jobs`.
"""

from __future__ import annotations

GB = 10**9
UPLOADS, ARTIFACTS = "uploads", "artifacts"


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
