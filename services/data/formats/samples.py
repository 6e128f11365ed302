"""What every dataset format builds (a `Dataset`, through formats/build.py: `finish`), its items, and the rules on
names and kinds it applies to every format alike: class names that print alike refused, images or videos but not both.

An item is a file (`Path`), a file inside a tar shard (`ShardMember`, read by its offset, never extracted; the shard a
local path or an object-store URL), a cell of an Arrow or Parquet file (`TableRow`, a Hugging Face dataset's image,
read in place by formats/tables.py), or an object in a store (`RemoteFile`, a manifest's row `s3://...`). Each answers
`name`, `suffix`, `read_bytes()` and `str()`, which names the item in messages. Torch-free.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.data.formats import remote
from services.data.formats.arrays import Column
from services.data.formats.left_out import LeftOut
from services.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov"}


class DatasetError(UserError, ValueError):
    """A dataset that cannot be used; the message names the cause (the file, the line). `field`: the job spec's
    field it is about (what the API names in a 422)."""

    code = "invalid_dataset"

    def __init__(self, message: str, field: str = "dataset.path") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, order=True)
class ShardMember:
    """A file inside an uncompressed tar shard: `size` bytes from `offset` (where its data starts). `member` is its
    name in the shard; `str()` is `<shard>/<member>`, as messages name it. Hashable and ordered, as paths are (the
    planner sorts the files a test set shares with the training set). `shard` is a local path, or an object-store
    URL (a str): a loader reads a batch's run of members by one ranged request (`read_together`), or one by its own."""

    shard: Path | str
    member: str
    offset: int
    size: int

    @property
    def name(self) -> str:
        return Path(self.member).name

    @property
    def suffix(self) -> str:
        return Path(self.member).suffix

    def __str__(self) -> str:
        return f"{self.shard}/{self.member}"

    def read_bytes(self) -> bytes:
        """The member's bytes; DatasetError if the shard no longer holds them (cut short or replaced since); for a
        shard in an object store, StoreUnavailable naming the shard if the store does not answer (after retries)."""
        try:
            if isinstance(self.shard, str):
                data = remote.read_range(self.shard, self.offset, self.size, "shard")
            else:
                data = _read_range(self.shard, self.offset, self.size)
        except OSError as e:
            raise DatasetError(f"{self}: the shard cannot be read ({e.strerror or e})") from None
        if len(data) != self.size:
            raise DatasetError(f"{self}: the shard ends inside this file ({len(data)} of {self.size} bytes)")
        return data


def _read_range(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


Table = Path | str  # an Arrow or Parquet file: a local path, or an object-store URL (formats/store_tables.py)


@dataclass(frozen=True, order=True)
class TableRow:
    """The image of row `row` of an Arrow (a `save_to_disk` folder's, or the Hub's download) or Parquet `file`, in
    its `column` (an Image feature's `bytes`, or a binary column); `stored` is the file name the row records (its
    suffix tells images from videos), or empty. `str()` is `<file>[<row>]`. Read in place by formats/tables.py (or,
    for a Parquet object in a store, by formats/store_tables.py), so the loader processes read a Hugging Face
    dataset's images without any being written out."""

    file: Table
    row: int
    column: str
    stored: str = ""

    @property
    def name(self) -> str:
        return Path(self.stored).name or f"row {self.row}"

    @property
    def suffix(self) -> str:
        return Path(self.stored).suffix

    def __str__(self) -> str:
        return f"{self.file}[{self.row}]"

    def read_bytes(self) -> bytes:
        """The image's bytes; DatasetError if the file no longer holds them; for an object in a store,
        StoreUnavailable naming it if the store does not answer (after retries)."""
        from services.data.formats import store_tables, tables  # pyarrow, only where a table is read

        try:
            if isinstance(self.file, str):
                return store_tables.read_cell(self.file, self.row, self.column)
            return tables.read_cell(self.file, self.row, self.column)
        except tables.TableError as e:
            raise DatasetError(f"{self}: {e}") from None
        except FileNotFoundError:
            raise DatasetError(f"{self}: the object no longer exists") from None


@dataclass(frozen=True, order=True)
class RemoteFile:
    """An object in a store (a manifest's row `s3://bucket/img/1.png`), with the size and version (ETag) it had when
    the dataset was read."""

    url: str
    size: int
    version: str

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    def __str__(self) -> str:
        return self.url

    def read_bytes(self) -> bytes:
        """The object's bytes; DatasetError if it is gone, StoreUnavailable naming it if the store does not answer."""
        try:
            return remote.read_all(self.url, "file")
        except FileNotFoundError:
            raise DatasetError(f"{self}: the object no longer exists") from None


Item = Path | ShardMember | TableRow | RemoteFile  # one sample's file
InFile = ShardMember | TableRow | RemoteFile  # an item that is not a local file of its own, read by its read_bytes()


def readable(item: Item) -> Path | bytes:
    """What the decoders take (services/data/images.py, services/video/decoding.py): a file, or its bytes."""
    return item.read_bytes() if isinstance(item, InFile) else item


RUN_GAP = 1 << 16  # members this close in one shard are read by one request (the bytes between them read too)
RUN_BYTES = 64 << 20  # the most one request reads


def read_together(paths: Sequence[Item], positions: Sequence[int]) -> dict[int, bytes]:
    """The bytes of the items in an object store among `paths[positions]` (a loader's batch): each run of members
    close together in one shard read by one ranged request rather than one each (a batch of consecutive samples is
    one request), and the objects of a manifest's URL rows fetched at once (`remote.read_many`), not one after the
    other. By position; an item that could not be read so is left out, for its own `read_bytes()` to name what is
    wrong; StoreUnavailable if the store does not answer (after retries)."""
    objects = {i: item.url for i in positions if isinstance(item := paths[i], RemoteFile)}
    fetched = remote.read_many(list(objects.values()), "file") if len(objects) > 1 else {}
    out = {i: fetched[url] for i, url in objects.items() if url in fetched}
    remote_members = sorted(
        (item.shard, item.offset, i)
        for i in positions
        if isinstance(item := paths[i], ShardMember) and isinstance(item.shard, str)
    )
    run: list[int] = []
    for k, (shard, offset, i) in enumerate(remote_members):
        run.append(i)
        after = remote_members[k + 1] if k + 1 < len(remote_members) else None
        end = offset + paths[i].size
        start = paths[run[0]].offset
        if (
            after is None
            or after[0] != shard
            or after[1] - end > RUN_GAP
            or after[1] + paths[after[2]].size - start > RUN_BYTES
        ):
            out.update(_read_run(shard, [paths[j] for j in run], run))
            run = []
    return out


def _read_run(shard: str, members: list[ShardMember], positions: list[int]) -> dict[int, bytes]:
    if len(members) == 1:
        return {}  # one member: its own read_bytes() reads it
    start = members[0].offset
    try:
        data = remote.read_range(shard, start, members[-1].offset + members[-1].size - start, "shard")
    except OSError:
        return {}
    out = {}
    for i, m in zip(positions, members, strict=True):
        piece = data[m.offset - start : m.offset - start + m.size]
        if len(piece) == m.size:
            out[i] = piece
    return out


@dataclass(frozen=True)
class Dataset:
    root: Path | str  # the folder holding it: a local path, or an object-store URL
    paths: Sequence[Item]  # each sample's file: a Path, a ShardMember of a WebDataset shard, a TableRow of a Hugging
    # Face dataset, or a RemoteFile; a list, or a compact column (formats/arrays.py: `Column`: `Files`, `Members`,
    # `TableRows`)
    labels: np.ndarray  # int64 class index per sample; multi-label: int64 0/1 [samples, classes] (multi-hot)
    classes: list[str]
    fingerprint: str
    left_out: LeftOut = LeftOut()  # rows left out: repeated files; under on_corrupt=skip, missing files,
    # multi-label rows without a tag, samples without a label, truncated shards (the first notes, a count per kind)
    kind: str = "image"  # or "video": the name of its modality (services/modality/)
    spans: np.ndarray | None = None  # videos of a manifest with start,end: float [N, 2] seconds, NaN where not given
    parts: np.ndarray | None = None  # the dataset's own split (a Hugging Face dataset's): uint8 per sample, 0 train,
    # 1 validation, 2 test; None: the job draws it (services/data/splits.py: `split_for`)

    @property
    def multi_label(self) -> bool:
        return self.labels.ndim == 2

    @property
    def skipped_rows(self) -> tuple[str, ...]:
        """The first notes on the rows left out (`left_out.total` counts them all)."""
        return self.left_out.notes

    def __len__(self) -> int:
        return len(self.paths)


def media_kind(paths: Sequence[Item], where: Path | str) -> str:
    """`image` or `video` by the files' suffixes; a dataset mixing both is refused."""
    suffixes = paths.suffixes() if isinstance(paths, Column) else (p.suffix for p in paths)
    videos = sum(s.lower() in VIDEO_SUFFIXES for s in suffixes)
    if videos and videos < len(paths):
        raise DatasetError(
            f"dataset {where} mixes images ({len(paths) - videos}) and videos ({videos}); a dataset "
            "holds one or the other"
        )
    return "video" if videos else "image"


def _form(name: str) -> str:
    return (
        "NFC"
        if unicodedata.is_normalized("NFC", name)
        else "NFD"
        if unicodedata.is_normalized("NFD", name)
        else "neither NFC nor NFD"
    )


def name_clash(a: str, b: str) -> str:
    """How two names that fold to one differ, each as its repr with code points escaped (what prints alike does not
    read alike): "'caf\\xe9' (NFC) and 'cafe\\u0301' (NFD) are one name in two Unicode forms"."""
    if unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b):
        return f"{ascii(a)} ({_form(a)}) and {ascii(b)} ({_form(b)}) are one name in two Unicode forms"
    if _form(a) != _form(b):
        return f"{ascii(a)} ({_form(a)}) and {ascii(b)} ({_form(b)}) differ only in Unicode form and case"
    return f"{ascii(a)} and {ascii(b)} differ only in case"


def check_distinct(names: list[str], what: str) -> None:
    """Refuse two of `names` (classes, tags) that are one name after Unicode NFC normalisation and case folding: two
    classes that print the same (and one folder on a case-insensitive or normalising file system)."""
    seen: dict[str, str] = {}
    for name in names:
        first = seen.setdefault(unicodedata.normalize("NFC", name).casefold(), name)
        if first != name:
            raise DatasetError(
                f"{what} {name_clash(first, name)}; rename one (or merge them) so that every class reads differently"
            )
