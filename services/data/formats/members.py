"""WebDataset shards' members as a compact column (formats/arrays.py: `Column`): each sample's media file as its
shard's index, offset and size in arrays and its name in one buffer, so that a million samples cost about 40 bytes
each instead of a `ShardMember` object (and its strings). A `ShardMember` is built when one is asked for (a loader
reading a sample, a message naming it); the column pickles as its arrays to the loader processes. Torch-free.
"""

from __future__ import annotations

import posixpath
import re
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from services.data.formats.arrays import (
    Coded,
    Column,
    Stamps,
    Texts,
    TextsBuilder,
    same_ids,
    sequence,
    under,
    values,
    whole,
)
from services.data.formats.samples import ShardMember

Shard = Path | str  # a local shard, or an object-store URL

KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's own split of a name: (dir/key, extension)


class Members(Column[ShardMember]):
    """Members of `shards`: member i is `names[i]` in `shards[shard[i]]`, `size[i]` bytes from `offset[i]`."""

    def __init__(
        self, shards: list[Shard], shard: np.ndarray, offset: np.ndarray, size: np.ndarray, names: Texts
    ) -> None:
        self.shards, self.shard, self.offset, self.size, self.names = shards, shard, offset, size, names

    def __len__(self) -> int:
        return len(self.shard)

    def item(self, i: int) -> ShardMember:
        return ShardMember(self.shards[self.shard[i]], self.names[i], int(self.offset[i]), int(self.size[i]))

    def __iter__(self) -> Iterator[ShardMember]:
        rows = zip(values(self.shard), self.names, values(self.offset), values(self.size), strict=True)
        return (ShardMember(self.shards[s], name, offset, size) for s, name, offset, size in rows)

    def take(self, rows: np.ndarray) -> Members:
        if len(rows) == len(self):
            return self
        return Members(self.shards, self.shard[rows], self.offset[rows], self.size[rows], self.names.take(rows))

    def stamps(self, spans: np.ndarray | None) -> Stamps:
        """A member by its shard (by device and inode, or URL) and offset, its size, and its shard's modification time
        or version: one stat per shard."""
        shard_stamps = [whole(s) for s in self.shards]
        ids: dict[tuple[int | str, ...], int] = {}
        same_shard = np.array([ids.setdefault(st.same, len(ids)) for st in shard_stamps], dtype=np.int64)
        keys = np.stack([same_shard[self.shard], self.offset], axis=1)
        changed = Coded(self.shard, [st.changed for st in shard_stamps])
        return Stamps(same_ids(keys, spans), self.size.astype(np.int64), changed)

    def relatives(self, root: Path | str) -> Iterator[str]:
        folders = [under(s, root) for s in self.shards]
        for s, name in zip(values(self.shard), self.names, strict=True):
            yield f"{folders[s]}/{name}"

    def suffixes(self) -> Iterator[str]:
        return (Path(name).suffix for name in self.names)

    def where(self) -> Where:
        """How messages name each sample: `shard <shard's name> sample <key>`."""
        return Where(self)


def base(shard: Shard) -> str:
    """A shard's file name, as messages name it."""
    return posixpath.basename(shard) if isinstance(shard, str) else shard.name


class Where(Sequence[str]):
    """`shard <name> sample <key>` for each member of a column, made when a message needs it."""

    def __init__(self, members: Members) -> None:
        self.members = members

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int) -> str:  # type: ignore[override] - rows, not slices
        m = self.members
        match = KEY.match(m.names[i])
        return f"shard {base(m.shards[m.shard[i]])} sample {match.group(1) if match else m.names[i]}"


class MembersBuilder:
    """`Members` gathered one sample at a time, shard after shard."""

    def __init__(self) -> None:
        self.shards: list[Shard] = []
        self._shard = array("i")
        self._offset = array("q")
        self._size = array("q")
        self._names = TextsBuilder()

    def __len__(self) -> int:
        return len(self._shard)

    def add(self, member: ShardMember) -> None:
        if not self.shards or self.shards[-1] != member.shard:
            self.shards.append(member.shard)
        self._shard.append(len(self.shards) - 1)
        self._offset.append(member.offset)
        self._size.append(member.size)
        self._names.append(member.member)

    def build(self) -> Members:
        return Members(
            self.shards,
            sequence(self._shard, np.int32),
            sequence(self._offset, np.int64),
            sequence(self._size, np.int64),
            self._names.build(),
        )
