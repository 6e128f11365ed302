"""The rows a dataset leaves out (repeated files; under on_corrupt=skip, missing files, rows without an image or a
label, samples and shards that cannot be used, splits a job does not take), as notes that stay small however many
rows there are: the first `KEEP` messages and a count of each kind (`LeftOut`), gathered row by row (`Notes`), so
that a manifest repeating a million rows keeps 20 messages, not a million. The plan and the job's events say how many
of each kind and show the first, ending "... and K more". Pure Python: the planner imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

KEEP = 20  # messages kept; the rest only counted

# kinds of row left out (the counts' keys)
REPEATED = "repeated"
MISSING = "missing file"
UNUSABLE = "unusable row"
NO_IMAGE = "no image"
NO_LABEL = "no label"
SHARD = "shard"
SPLIT = "split"


@dataclass(frozen=True)
class LeftOut:
    """The first `KEEP` notes on rows left out, and how many rows of each kind, in the order first met."""

    notes: tuple[str, ...] = ()
    counts: tuple[tuple[str, int], ...] = ()

    @property
    def total(self) -> int:
        return sum(n for _, n in self.counts)

    def __bool__(self) -> bool:
        return self.total > 0

    def kinds(self) -> str:
        """`repeated: 3, missing file: 1`."""
        return ", ".join(f"{kind}: {n:,}" for kind, n in self.counts)

    def text(self, shown: int = 1) -> str:
        """What the plan and the job's events say: `5 dataset rows are left out (repeated: 4, missing file: 1): <the
        first `shown` notes> ... and 4 more`."""
        listed = "; ".join(self.notes[:shown])
        more = self.total - min(shown, len(self.notes))
        return f"{self.total:,} dataset rows are left out ({self.kinds()}): {listed}" + (
            f" ... and {more:,} more" if more else ""
        )

    def listed(self) -> list[str]:
        """The notes kept, and `... and K more` for those only counted (an event's data)."""
        more = self.total - len(self.notes)
        return [*self.notes, f"... and {more:,} more"] if more else list(self.notes)


def left_out_data(left: LeftOut) -> dict[str, object]:
    """A job event's data on the rows left out: the notes kept (and `... and K more`), and the count of each kind."""
    return {"left_out": left.listed(), "left_out_counts": dict(left.counts)}


def left_out_count(meta: Mapping[str, object]) -> int:
    """The rows a cache entry's dataset left out, by its meta: the counts of each kind (`left_out`), or, in an entry
    written before they were counted, its notes, which then listed every row."""
    counts = meta.get("left_out")
    if isinstance(counts, Mapping):
        return sum(int(n) for n in counts.values())
    notes = meta.get("skipped_rows")
    return len(notes) if isinstance(notes, list) else 0


class Notes:
    """`LeftOut` gathered one row at a time (`add`), after the `earlier` ones (a format's, before `finish` adds the
    repeated files)."""

    def __init__(self, earlier: LeftOut | None = None) -> None:
        self._notes = list(earlier.notes) if earlier else []
        self._counts = dict(earlier.counts) if earlier else {}

    def __len__(self) -> int:
        return sum(self._counts.values())

    def add(self, kind: str, note: str | Callable[[], str]) -> None:
        """A row of `kind` left out; `note` says which and why (kept among the first `KEEP`; a function making it is
        called only then, so that a million repeated rows are counted without a message made for each)."""
        self._counts[kind] = self._counts.get(kind, 0) + 1
        if len(self._notes) < KEEP:
            self._notes.append(note() if callable(note) else note)

    def build(self) -> LeftOut:
        return LeftOut(tuple(self._notes), tuple(self._counts.items()))
