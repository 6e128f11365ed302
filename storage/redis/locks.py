"""Leases in Redis: one extraction per cache key (LeaseLock) and "in use" marks that keep entries from eviction (Pin).

Both are leases renewed by a daemon thread every lease/3 while held: a long extraction keeps its lock, and a
holder that dies (SIGKILL, lost machine) stops renewing, so its lock or pin expires after one lease.
LeaseLock is a Redis key holding its owner's token (SET NX PX; Lua compare-and-delete and compare-and-pexpire, so only
the owner can release or renew) plus the renewal thread.

The job store hands them out (storage/redis/store.py), so no caller names a key. Dedup pattern for a step that
builds cache entry `key`:
    lock = store.extraction_lock(key, job_id)
    if acquire_or_wait(lock, done=lambda: cache.entry(key).is_complete, on_wait=check_cancel):
        with lock:   # we hold it: build or resume the entry; check `lock.lost` between batches and stop if set
            ...
    # else another job completed the entry while we waited: nothing is held, just use it

Readers pin what they use and check it afterwards (an evictor may have removed it just before the pin):
    with store.pin(key, holder=job_id) as pin:   # pin.acquire() is False while the entry is being evicted
        if pin.held and cache.entry(key).is_complete: ...read...   else: treat as a cache miss
Evictors pass `store.pins()` as FeatureCache.evict's guard: evictors take turns (lease lock `CACHE_EVICT`), and an
entry is only removed if it has no live pin, atomically (new pins are refused while it is being removed).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import redis

from storage.redis.keys import CACHE_EVICT, CACHE_LOCK
from storage.redis.keys import CACHE_EVICTING as EVICTING
from storage.redis.keys import CACHE_PIN as PIN

log = logging.getLogger(__name__)

# KEYS: lock; ARGV: token. Deletes the lock if the token owns it.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# KEYS: lock; ARGV: token, lease ms. Renews the lock's lease if the token owns it.
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: pin zset, eviction mark; ARGV: holder, ttl ms. Refused (0) while the entry is being evicted.
_PIN = """
if redis.call('exists', KEYS[2]) == 1 then return 0 end
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
redis.call('zadd', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if redis.call('pttl', KEYS[1]) < tonumber(ARGV[2]) then redis.call('pexpire', KEYS[1], ARGV[2]) end
return 1
"""
# KEYS: pin zset, eviction mark; ARGV: ttl ms. Marks the entry as being evicted unless a live pin exists.
_BEGIN_EVICTION = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('zcount', KEYS[1], now + 1, '+inf') > 0 then return 0 end
redis.call('set', KEYS[2], '1', 'PX', ARGV[1])
return 1
"""


class _Lease:
    """Calls `_renew()` every `interval_s` in a daemon thread until stopped or `_renew()` returns False (lost)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        """True once a renewal found the lease gone (expired or taken): stop working on what it protected."""
        return self._lost.is_set()

    def _renew(self) -> bool:
        raise NotImplementedError

    def _start(self) -> None:
        self._stop.clear()
        self._lost.clear()
        self._thread = threading.Thread(target=self._run, name=f"renew-{type(self).__name__}", daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self._renew():
                    self._lost.set()
                    return
            except redis.RedisError as exc:  # e.g. Redis restarting: try again next tick, the lease may survive
                log.warning("lease renewal failed: %s", exc)


class LeaseLock(_Lease):
    """An exclusive lock named `name`, leased for `lease_s` seconds and renewed every lease_s/3 while held.

    The lock is a Redis key holding its owner's token, set with SET NX PX; release and renewal are Lua
    compare-and-delete and compare-and-pexpire scripts, so only the owner can release or renew it (the pattern of
    the Redis documentation's single-instance lock)."""

    def __init__(self, client: redis.Redis, name: str, lease_s: float = 30.0, token: str | None = None) -> None:
        super().__init__(lease_s / 3)
        self.client, self.name, self.lease_ms = client, name, int(lease_s * 1000)
        # A fixed token (e.g. a job id) lets several processes of one owner share the lock: see `adopt`.
        self.token = token or uuid.uuid4().hex
        self._release = client.register_script(_RELEASE)
        self._extend = client.register_script(_EXTEND)
        self._acquired = False

    def acquire(self, blocking: bool = False, timeout_s: float | None = None) -> bool:
        """Take the lock if free; with `blocking`, wait for it (up to `timeout_s`). True when taken."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.client.set(self.name, self.token, nx=True, px=self.lease_ms):
            if not blocking or (deadline is not None and time.monotonic() > deadline):
                return False
            time.sleep(0.05)
        self._acquired = True
        self._start()
        return True

    def release(self) -> bool:
        """Stop renewing and free the lock if this object still owns it; True if it did. Never frees another's."""
        self._halt()
        if not self._acquired:
            return False
        self._acquired = False
        # False if the lease expired (and maybe another holder took it): theirs is left alone
        return bool(self._release(keys=[self.name], args=[self.token]))

    def adopt(self) -> bool:
        """Join a lock that another process of the same owner (same fixed `token`) holds, renewing it from here too;
        False if it is free or held by another owner."""
        if not self._renew():
            return False
        self._acquired = True
        self._start()
        return True

    def detach(self) -> None:
        """Stop renewing here but leave the lock held, for other processes of the owner to adopt (it expires
        after one lease if none does)."""
        self._halt()
        self._acquired = False

    @property
    def held(self) -> bool:
        """Whether this object owns the lock in Redis right now."""
        return self._acquired and self._owner() == self.token

    def locked(self) -> bool:
        """Whether anyone holds the lock."""
        return bool(self.client.exists(self.name))

    def _owner(self) -> str | None:
        raw = self.client.get(self.name)
        return raw.decode() if isinstance(raw, bytes) else raw

    def _renew(self) -> bool:
        return bool(self._extend(keys=[self.name], args=[self.token, self.lease_ms]))

    def __enter__(self) -> LeaseLock:
        """Block until acquired, unless this object holds it already (e.g. after acquire_or_wait)."""
        if not self._acquired:
            self.acquire(blocking=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_or_wait(
    lock: LeaseLock,
    done: Callable[[], bool],
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    on_wait: Callable[[float], None] | None = None,
) -> bool:
    """Wait until either `done()` (someone else finished the work: returns False, nothing held) or `lock` is taken
    by us with the work still not done (returns True: do or resume it, then release). `on_wait(waited_s)` runs
    at each poll while another holder works, and may raise to give up (e.g. on cancel); TimeoutError after
    `timeout_s`. A dead holder's lease expires, so a waiter then takes over and resumes the work."""
    start = time.monotonic()
    while True:
        if done():
            return False
        if lock.acquire():
            if not done():  # the previous holder may have finished between our check and our acquire
                return True
            lock.release()
            return False
        waited = time.monotonic() - start
        if timeout_s is not None and waited > timeout_s:
            raise TimeoutError(f"waited {waited:.0f}s for {lock.name}")
        if on_wait is not None:
            on_wait(waited)
        time.sleep(poll_s)


class Pin(_Lease):
    """Marks cache entry `key` as in use by `holder` for `ttl_s`, renewed every ttl_s/3 while held, so eviction
    skips it; a dead holder's pin expires. Several holders can pin one key."""

    def __init__(self, client: redis.Redis, key: str, holder: str | None = None, ttl_s: float = 60.0) -> None:
        super().__init__(ttl_s / 3)
        self.client, self.key, self.ttl_s = client, key, ttl_s
        self.holder = f"{holder or 'pin'}:{uuid.uuid4().hex[:12]}"  # unique, so two pins of one job are distinct
        self.held = False
        self._script = client.register_script(_PIN)

    def _pin(self) -> bool:
        keys = [PIN + self.key, EVICTING + self.key]
        return bool(self._script(keys=keys, args=[self.holder, int(self.ttl_s * 1000)]))

    def acquire(self) -> bool:
        """Pin the entry; False (not pinned) while it is being evicted: treat it as a cache miss."""
        if self.held:
            return True
        self.held = self._pin()
        if self.held:
            self._start()
        return self.held

    def release(self) -> None:
        self._halt()
        if self.held:
            self.client.zrem(PIN + self.key, self.holder)
        self.held = False

    _renew = _pin

    def __enter__(self) -> Pin:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Pins:
    """The pins of all cache entries, and FeatureCache.evict's guard: entered, it holds the lease lock
    `CACHE_EVICT` (one evictor at a time, across processes); begin_eviction/end_eviction mark one entry."""

    def __init__(self, client: redis.Redis, mark_ttl_s: float = 300.0) -> None:
        self.client = client
        self.mark_ttl_ms = int(mark_ttl_s * 1000)  # outlives a rename; expires if the evictor dies in between
        self._begin = client.register_script(_BEGIN_EVICTION)
        self._local = threading.local()  # each thread entering this object holds a lock of its own

    def __enter__(self) -> Pins:
        self._local.lock = LeaseLock(self.client, CACHE_EVICT, lease_s=30.0)
        self._local.lock.acquire(blocking=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._local.lock.release()

    def pinned_keys(self) -> set[str]:
        """Keys with at least one live pin (expired pins of dead holders are ignored)."""
        keys = [k.decode() if isinstance(k, bytes) else k for k in self.client.scan_iter(match=PIN + "*", count=500)]
        sec, usec = self.client.time()
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.zcount(k, sec * 1000 + usec // 1000 + 1, "+inf")
        return {k[len(PIN) :] for k, n in zip(keys, pipe.execute(), strict=True) if n}

    def holders(self, key: str) -> list[str]:
        """Who pins `key` now: the `holder` each live Pin was given (a job id)."""
        sec, usec = self.client.time()
        members = self.client.zrangebyscore(PIN + key, sec * 1000 + usec // 1000 + 1, "+inf")
        return sorted({(m.decode() if isinstance(m, bytes) else m).rsplit(":", 1)[0] for m in members})

    def extracting(self, key: str) -> str | None:
        """The job that holds `key`'s extraction lock (writing it), if any."""
        token = self.client.get(CACHE_LOCK + key)
        return token.decode() if isinstance(token, bytes) else token

    def begin_eviction(self, key: str) -> bool:
        """Atomically: if `key` has no live pin, mark it as being evicted (new pins are refused) and return True."""
        return bool(self._begin(keys=[PIN + key, EVICTING + key], args=[self.mark_ttl_ms]))

    def end_eviction(self, key: str) -> None:
        """Drop the mark once the entry is gone (renamed away), so a rebuilt entry of that key can be pinned."""
        self.client.delete(EVICTING + key)
