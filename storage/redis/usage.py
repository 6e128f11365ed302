"""Byte counters per key in Redis (`usage:<owner>`, a hash: uploaded datasets and models), checked against the key's
quotas (storage/quotas.py: the limits' errors). A reservation checks and adds in one Lua script, so concurrent uploads
never pass a quota together."""

from __future__ import annotations

import redis

from storage.quotas import ARTIFACTS, GB, UPLOADS, QuotaExceeded, human
from storage.redis import keys

# KEYS[1] the usage hash; ARGV: field, bytes to add, limit (-1: none). Returns {admitted 0/1, usage after (or now)}.
_RESERVE = """
local used = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local add, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
if limit >= 0 and used + add > limit then return {0, used} end
return {1, redis.call('HINCRBY', KEYS[1], ARGV[1], add)}
"""


class Usage:
    """Byte counters per key: uploaded datasets and models."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._reserve = client.register_script(_RESERVE)

    def get(self, owner: str | None, kind: str) -> int:
        return int(self.r.hget(keys.usage(owner), kind) or 0)

    def reserve(self, owner: str | None, kind: str, nbytes: int, limit_gb: float | None, setting: str) -> None:
        """Add `nbytes` to the key's `kind` usage, atomically refusing (QuotaExceeded) if that passes `limit_gb`."""
        limit = -1 if limit_gb is None else round(limit_gb * GB)
        ok, used = self._reserve(keys=[keys.usage(owner)], args=[kind, int(nbytes), limit])
        if not ok:
            raise _refusal(kind, used, limit, setting, need=nbytes)

    def add(self, owner: str | None, kind: str, nbytes: int, pipe: redis.client.Pipeline | None = None) -> None:
        """Count `nbytes` (negative: give them back) without a check; within `pipe`'s transaction if given."""
        (pipe if pipe is not None else self.r).hincrby(keys.usage(owner), kind, int(nbytes))

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
