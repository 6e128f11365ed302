"""What every dataset format builds its `Dataset` with (`finish`: rows of (item, label) -> `Dataset`), and the rules
it applies to every format alike: each file once, one label per file, class names that print alike refused, images
or videos but not both, and the fingerprint over the items (names, sizes, modification times) that keys the feature
cache.

What tells items apart and what says they changed is each item's stamp: the file by device and inode, an object by
its URL, a shard's member by its offset in the shard, a table's row by its number; its size; its modification time or
version. Items in a column (formats/arrays.py: `Column`: local files, shards' members, tables' rows) stamp themselves
and are compared as arrays, the labels as indices (`Labels`), so a million rows cost arrays, not objects; items in a
list (a manifest's objects) one by one. Either way the rows kept, the messages and the fingerprint are the same.
Torch-free.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from services.data.formats.arrays import Column, Stamps, Whole, under, whole
from services.data.formats.columns import Files, Labels
from services.data.formats.left_out import REPEATED, LeftOut, Notes
from services.data.formats.samples import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    Dataset,
    DatasetError,
    Item,
    RemoteFile,
    ShardMember,
    TableRow,
    check_distinct,
    media_kind,
)

_CHUNK = 8192  # fingerprint lines hashed at a time


def _stamp(item: Item, shards: dict[Path | str, Whole]) -> Whole:
    if isinstance(item, RemoteFile):
        return Whole((item.url,), item.size, item.version)
    if isinstance(item, ShardMember):
        shard = shards.get(item.shard)
        if shard is None:  # one stat per shard, not per member
            shard = shards[item.shard] = whole(item.shard)
        return Whole((*shard.same, item.offset), item.size, shard.changed)
    if isinstance(item, TableRow):  # the row by its number in the file; changed with the file
        table = shards.get(item.file)
        if table is None:
            table = shards[item.file] = whole(item.file)
        return Whole((*table.same, item.row), table.size, table.changed)
    return whole(item)


def stamps(paths: Sequence[Item], spans: np.ndarray | None) -> Stamps:
    """The stamps of `paths` (a column stamps itself, as arrays); with `spans`, clips of one video are distinct."""
    if isinstance(paths, Column):
        return paths.stamps(spans)
    shards: dict[Path | str, Whole] = {}
    ids: dict[tuple, int] = {}
    same, size, changed = [], [], []
    for i, p in enumerate(paths):
        st = _stamp(p, shards)
        span = () if spans is None else (repr(spans[i, 0]), repr(spans[i, 1]))  # clips of one video are distinct
        same.append(ids.setdefault((*st.same, *span), len(ids)))
        size.append(st.size)
        changed.append(st.changed)
    return Stamps(np.asarray(same, dtype=np.int64), np.asarray(size, dtype=np.int64), changed)


def each_once(
    same: np.ndarray,
    codes: np.ndarray,
    names: list[str],
    paths: Sequence[Item],
    where: Sequence[str],
    duplicates: str,
    notes: Notes,
) -> np.ndarray:
    """The rows to keep (each file once: the first row of each), ascending; each repeated row noted in `notes`, or
    refused (DatasetError) with another label (`codes` index `names`), or at all with `duplicates="fail"`. Rows are
    taken in order, so the first offending row is the one named."""
    n = len(same)
    rows = np.arange(n)
    if not n:
        return rows
    _, first, inverse = np.unique(same, return_index=True, return_inverse=True)
    first_of = first[inverse.reshape(-1)]
    for i in np.flatnonzero(first_of != rows).tolist():
        f = int(first_of[i])
        name, first_name = names[codes[i]], names[codes[f]]
        if first_name != name:
            raise DatasetError(
                f"{where[i]}: {paths[i].name} is also {where[f]} with another label ({first_name!r} vs "
                f"{name!r}); one file cannot be in two classes"
            )
        if duplicates == "fail":
            raise DatasetError(
                f"{where[i]}: {paths[i].name} is listed again (first: {where[f]}); remove the repeated rows "
                "or set dataset.duplicates='drop'"
            )
        notes.add(REPEATED, lambda i=i, f=f: f"{where[i]}: {paths[i].name} repeats {where[f]}, left out")
    return np.flatnonzero(first_of == rows)


def _relative(item: Item, root: Path | str) -> str:
    if isinstance(item, ShardMember):
        return f"{under(item.shard, root)}/{item.member}"
    if isinstance(item, TableRow):
        return f"{under(item.file, root)}[{item.row}]"
    return under(item.url if isinstance(item, RemoteFile) else item, root)


def _relatives(paths: Sequence[Item], root: Path | str) -> Iterator[str]:
    """Each item's name under `root`, as `_relative` writes it (a column's without building its items)."""
    if isinstance(paths, Column):
        return paths.relatives(root)
    return (_relative(p, root) for p in paths)


def fingerprint(
    root: Path | str,
    paths: Sequence[Item],
    codes: np.ndarray,
    texts: list[str],
    st: Stamps,
    spans: np.ndarray | None = None,
) -> str:
    """A hash of every item's name under `root`, label (`texts[codes[i]]`), size and modification time or version
    (and span): another dataset, or the same one changed, has another. Hashed `_CHUNK` rows at a time, so that no
    column is ever a list of a million Python objects."""
    h = hashlib.sha256()
    names = _relatives(paths, root)
    for start in range(0, len(codes), _CHUNK):
        rows = slice(start, start + _CHUNK)
        chunk = st.take_slice(rows)
        lines = []
        for i, (code, size, changed) in enumerate(
            zip(codes[rows].tolist(), chunk.size.tolist(), chunk.changed_texts(), strict=True), start=start
        ):
            span = "" if spans is None else f"\0{spans[i, 0]!r}\0{spans[i, 1]!r}"  # images' fingerprints are unchanged
            lines.append(f"{next(names)}\0{texts[code]}\0{size}\0{changed}{span}\n")
        h.update("".join(lines).encode())
    return h.hexdigest()[:32]


def _multi_hot(codes: np.ndarray, tags: list[list[int]], n_classes: int) -> np.ndarray:
    """int64 [rows, classes], 1 where row i's label (`codes[i]`) has the tag: `tags[code]`, tag indices."""
    lens = np.array([len(t) for t in tags], dtype=np.int64)
    flat = np.array([t for row in tags for t in row], dtype=np.int64)
    starts = np.cumsum(lens) - lens
    per_row = lens[codes]
    rows = np.repeat(np.arange(len(codes)), per_row)
    offsets = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    labels = np.zeros((len(codes), n_classes), dtype=np.int64)
    labels[rows, flat[np.repeat(starts[codes], per_row) + offsets]] = 1
    return labels


def finish(
    root: Path | str,
    paths: Sequence[Item],
    names: Sequence[str],
    where: Sequence[str],
    duplicates: str = "drop",
    skipped: LeftOut = LeftOut(),
    spans: np.ndarray | None = None,
    multi_label: bool = False,
    what: str = "class folders",
    order: list[str] | None = None,
    parts: np.ndarray | None = None,
) -> Dataset:
    """The dataset of (item, label) rows, each file once: a file listed again (the same file by device and inode:
    a repeated row, `./a.png` next to `a.png`, a link to it; a shard's member by its offset too) is left out with the
    same label (`duplicates="drop"`, noted after the rows the format `skipped`: `Dataset.left_out`) or refused
    (`"fail"`), and refused with another label. So no file can land in two splits. `where` names each row for the
    messages (a manifest's line, or the file). `names` are the labels (a list, or `Labels`). The classes are sorted
    by name, or in `order` (a Hugging Face ClassLabel's names; those without a sample left out); `parts` is the
    dataset's own split code of each row (formats/samples.py: `Dataset.parts`)."""
    notes = Notes(skipped)
    labels_in = names if isinstance(names, Labels) else Labels.of(names)
    codes, texts = labels_in.codes, labels_in.names
    if isinstance(paths, Files):
        paths = paths.with_stats()
    st = stamps(paths, spans)
    keep = each_once(st.same, codes, texts, paths, where, duplicates, notes)
    if len(keep) < len(codes):
        paths = paths.take(keep) if isinstance(paths, Column) else [paths[i] for i in keep]
        codes, st = codes[keep], st.take(keep)
        spans = spans[keep] if spans is not None else None
        parts = parts[keep] if parts is not None else None
    tags = [[t.strip() for t in n.split("|") if t.strip()] if multi_label else [n] for n in texts]
    present = {t for c in np.unique(codes).tolist() for t in tags[c]}
    classes = [c for c in dict.fromkeys(order or ()) if c in present] + sorted(present - set(order or ()))
    check_distinct(classes, "tags" if multi_label else what)
    if len(paths) == 0:
        raise DatasetError(
            f"dataset {root} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))}) or videos "
            f"({', '.join(sorted(VIDEO_SUFFIXES))})"
        )
    if len(classes) < 2:
        raise DatasetError(
            f"dataset {root} has {len(classes)} {'tag' if multi_label else 'class'}; at least 2 are needed"
        )
    kind = media_kind(paths, root)
    if spans is not None and kind != "video":
        raise DatasetError(f"{root}: `start`/`end` columns apply to videos only")
    index = {c: i for i, c in enumerate(classes)}
    tag_index = [[index[t] for t in row if t in index] for row in tags]  # labels of no kept row have none
    if order is not None:  # the same names in another order are other labels: not the same cache entry
        texts = [f"{n}\0{'|'.join(str(i) for i in row)}" for n, row in zip(texts, tag_index, strict=True)]
    if multi_label:
        labels = _multi_hot(codes, tag_index, len(classes))
        # the same manifest read as single-label holds other labels: it must not share a cache entry
        texts = [f"multi-label:{n}" for n in texts]
    else:
        first = np.array([row[0] if row else -1 for row in tag_index], dtype=np.int64)
        labels = first[codes] if len(codes) else np.empty(0, np.int64)
    fp = fingerprint(root, paths, codes, texts, st, spans)
    if isinstance(paths, Files):  # the stats were the fingerprint's: the loader processes need not be sent them
        paths = paths.without_stats()
    return Dataset(root, paths, labels, classes, fp, kind=kind, spans=spans, left_out=notes.build(), parts=parts)
