"""What least-recently-used eviction removes, computed by one function for both the planner's promise ("fits after
evicting ...", services/jobs/planner.py) and the worker's act (`FeatureCache.evict`, before an extraction): entries
go, least recently used first, until the bytes about to be written fit the cache quota and the free disk.

`Room` is what the new entry must fit: the quota (`SIDETUNE_CACHE_QUOTA_GB`, if set) and the free space of the
cache's disk (where it can be measured: a local directory, not an object store). Candidates are complete entries not
kept by the caller (an entry being written is never one); `eligible` narrows them further (e.g. to one owner's).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storage.cache.entry import CacheEntry


@dataclass(frozen=True)
class Candidate:
    key: str
    nbytes: int
    recency: float  # last_used, else the completion time


@dataclass(frozen=True)
class Room:
    """The space a new entry must fit in: `quota` (None: none) less `used`, and `free` bytes on the disk (None: not
    measurable, e.g. an object store)."""

    used: int
    quota: int | None
    free: int | None

    def shortfall(self, need: int) -> int:
        """Bytes to free before `need` more bytes fit both the quota and the disk (0: they fit)."""
        over = 0
        if self.quota is not None:
            over = max(over, self.used + need - self.quota)
        if self.free is not None:
            over = max(over, need - self.free)
        return over

    def available(self) -> int | None:
        """The most that fits now; None when nothing limits it (an object store without a quota)."""
        limits = [x for x in (None if self.quota is None else self.quota - self.used, self.free) if x is not None]
        return max(0, min(limits)) if limits else None

    def without(self, nbytes: int) -> Room:
        """The room once `nbytes` of entries on the same disk are removed."""
        return Room(self.used - nbytes, self.quota, None if self.free is None else self.free + nbytes)


def candidates(
    entries: Iterable[CacheEntry],
    keep: Collection[str] = (),
    eligible: Callable[[CacheEntry], bool] | None = None,
    size: Callable[[CacheEntry], int] | None = None,
) -> list[Candidate]:
    """Complete entries not in `keep` that `eligible` accepts (default: all), least recently used first, each of
    `size(entry)` bytes (default: its bytes on disk; a key's quota counts what the entry is charged)."""
    out = []
    for entry in entries:
        if entry.key in keep or (eligible is not None and not eligible(entry)):
            continue
        try:  # an incomplete entry is being written (or resumed): in use, never evicted
            if not entry.is_complete:
                continue
            out.append(
                Candidate(entry.key, entry.nbytes() if size is None else size(entry), entry.last_used or entry.created)
            )
        except OSError:  # vanished meanwhile (evicted by another process)
            continue
    return sorted(out, key=lambda c: (c.recency, c.key))


def choose(
    ordered: Iterable[Candidate], need: int, room: Room, remove: Callable[[Candidate], bool] = lambda c: True
) -> list[Candidate]:
    """The candidates (least recently used first) to remove so that `need` more bytes fit `room`. `remove(c)` is
    called on each chosen one in turn and may refuse it (False: in use, or gone), in which case the next is taken.
    Returns those removed: not enough to fit when the candidates run out."""
    removed: list[Candidate] = []
    for c in ordered:
        if room.shortfall(need) <= 0:
            break
        if remove(c):
            removed.append(c)
            room = room.without(c.nbytes)
    return removed
