"""What every dataset format builds (`finish`: rows of (item, label) -> `Dataset`), and the rules it applies to every
format alike: each file once, one label per file, class names that print alike refused, images or videos but not
both, and the fingerprint over the items (names, sizes, modification times) that keys the feature cache.

An item is a file (`Path`), a file inside a tar shard (`ShardMember`, read by its offset, never extracted; the shard a
local path or an object-store URL), a cell of an Arrow or Parquet file (`TableRow`, a Hugging Face dataset's image,
read in place by formats/tables.py), or an object in a store (`RemoteFile`, a manifest's row `s3://...`). Each answers
`name`, `suffix`, `read_bytes()` and `str()`, which names the item in messages. Torch-free.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.data.formats import remote
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
    URL (a str) read by one ranged request per member."""

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


@dataclass(frozen=True, order=True)
class TableRow:
    """The image of row `row` of an Arrow (a `save_to_disk` folder's, or the Hub's download) or Parquet `file`, in
    its `column` (an Image feature's `bytes`, or a binary column); `stored` is the file name the row records (its
    suffix tells images from videos), or empty. `str()` is `<file>[<row>]`. Read in place by formats/tables.py, so
    the loader processes read a Hugging Face dataset's images without any being written out."""

    file: Path
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
        """The image's bytes; DatasetError if the file no longer holds them."""
        from services.data.formats.tables import TableError, read_cell  # pyarrow, only where a table is read

        try:
            return read_cell(self.file, self.row, self.column)
        except TableError as e:
            raise DatasetError(f"{self}: {e}") from None


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


@dataclass(frozen=True)
class Dataset:
    root: Path | str  # the folder holding it: a local path, or an object-store URL
    paths: list[Item]  # each sample's file: a Path, a ShardMember of a WebDataset shard, a TableRow of a Hugging
    # Face dataset, or a RemoteFile
    labels: np.ndarray  # int64 class index per sample; multi-label: int64 0/1 [samples, classes] (multi-hot)
    classes: list[str]
    fingerprint: str
    skipped_rows: tuple[str, ...] = ()  # rows left out: repeated files; under on_corrupt=skip, missing files,
    # multi-label rows without a tag, samples without a label, truncated shards
    kind: str = "image"  # or "video": the name of its modality (services/modality/)
    spans: np.ndarray | None = None  # videos of a manifest with start,end: float [N, 2] seconds, NaN where not given
    parts: np.ndarray | None = None  # the dataset's own split (a Hugging Face dataset's): uint8 per sample, 0 train,
    # 1 validation, 2 test; None: the job draws it (services/data/splits.py: `split_for`)

    @property
    def multi_label(self) -> bool:
        return self.labels.ndim == 2

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class _Stamp:
    """What tells one item from another (`same`: the file by device and inode, or the object by its URL, and the
    member's offset in it) and what says it changed (`size`, `changed`: the modification time in ns, or the object's
    version)."""

    same: tuple[int | str, ...]
    size: int
    changed: str


def _whole(path: Path | str) -> _Stamp:
    if isinstance(path, str):
        info = remote.stat(path, "shard")
        return _Stamp((path,), info.size, info.version)
    st = path.stat()
    return _Stamp((st.st_dev, st.st_ino), st.st_size, str(st.st_mtime_ns))


def _stamp(item: Item, shards: dict[Path | str, _Stamp]) -> _Stamp:
    if isinstance(item, RemoteFile):
        return _Stamp((item.url,), item.size, item.version)
    if isinstance(item, ShardMember):
        shard = shards.get(item.shard)
        if shard is None:  # one stat per shard, not per member
            shard = shards[item.shard] = _whole(item.shard)
        return _Stamp((*shard.same, item.offset), item.size, shard.changed)
    if isinstance(item, TableRow):  # the row by its number in the file; changed with the file
        table = shards.get(item.file)
        if table is None:
            table = shards[item.file] = _whole(item.file)
        return _Stamp((*table.same, item.row), table.size, table.changed)
    return _whole(item)


def _under(path: Path | str, root: Path | str) -> str:
    if isinstance(path, str):  # a URL
        folder = str(root).rstrip("/") + "/"
        return path.removeprefix(folder)
    return str(path.relative_to(root) if isinstance(root, Path) and path.is_relative_to(root) else path)


def _relative(item: Item, root: Path | str) -> str:
    if isinstance(item, ShardMember):
        return f"{_under(item.shard, root)}/{item.member}"
    if isinstance(item, TableRow):
        return f"{_under(item.file, root)}[{item.row}]"
    return _under(item.url if isinstance(item, RemoteFile) else item, root)


def _fingerprint(
    root: Path | str, items: list[Item], labels: list[str], stamps: list[_Stamp], spans: np.ndarray | None = None
) -> str:
    h = hashlib.sha256()
    for i, (item, label, st) in enumerate(zip(items, labels, stamps, strict=True)):
        span = "" if spans is None else f"\0{spans[i, 0]!r}\0{spans[i, 1]!r}"  # images' fingerprints are unchanged
        h.update(f"{_relative(item, root)}\0{label}\0{st.size}\0{st.changed}{span}\n".encode())
    return h.hexdigest()[:32]


def media_kind(paths: list[Item], where: Path | str) -> str:
    """`image` or `video` by the files' suffixes; a dataset mixing both is refused."""
    videos = sum(p.suffix.lower() in VIDEO_SUFFIXES for p in paths)
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


def _each_once(
    paths: list[Item], names: list[str], where: list[str], duplicates: str, spans: np.ndarray | None, notes: list[str]
) -> tuple[list[int], list[_Stamp]]:
    """The rows to keep (each file once) and their stamps; repeated rows noted in `notes` or refused."""
    keep: list[int] = []
    stamps: list[_Stamp] = []
    seen: dict[tuple, int] = {}
    shards: dict[Path | str, _Stamp] = {}
    for i, (p, name, at) in enumerate(zip(paths, names, where, strict=True)):
        st = _stamp(p, shards)
        span = () if spans is None else (repr(spans[i, 0]), repr(spans[i, 1]))  # clips of one video are distinct
        first = seen.setdefault((*st.same, *span), i)
        if first != i:
            if names[first] != name:
                raise DatasetError(
                    f"{at}: {p.name} is also {where[first]} with another label ({names[first]!r} vs "
                    f"{name!r}); one file cannot be in two classes"
                )
            if duplicates == "fail":
                raise DatasetError(
                    f"{at}: {p.name} is listed again (first: {where[first]}); remove the repeated rows "
                    "or set dataset.duplicates='drop'"
                )
            notes.append(f"{at}: {p.name} repeats {where[first]}, left out")
            continue
        keep.append(i)
        stamps.append(st)
    return keep, stamps


def finish(
    root: Path | str,
    paths: list[Item],
    names: list[str],
    where: list[str],
    duplicates: str = "drop",
    skipped: tuple[str, ...] = (),
    spans: np.ndarray | None = None,
    multi_label: bool = False,
    what: str = "class folders",
    order: list[str] | None = None,
    parts: np.ndarray | None = None,
) -> Dataset:
    """The dataset of (item, label) rows, each file once: a file listed again (the same file by device and inode:
    a repeated row, `./a.png` next to `a.png`, a link to it; a shard's member by its offset too) is left out with the
    same label (`duplicates="drop"`, noted in `skipped_rows`) or refused (`"fail"`), and refused with another label.
    So no file can land in two splits. `where` names each row for the messages (a manifest's line, or the file).
    The classes are sorted by name, or in `order` (a Hugging Face ClassLabel's names; those without a sample left
    out); `parts` is the dataset's own split code of each row (formats/samples.py: `Dataset.parts`)."""
    notes = list(skipped)
    keep, stamps = _each_once(paths, names, where, duplicates, spans, notes)
    paths, names = [paths[i] for i in keep], [names[i] for i in keep]
    spans = spans[keep] if spans is not None else None
    parts = parts[keep] if parts is not None else None
    tags = [[t.strip() for t in n.split("|") if t.strip()] for n in names] if multi_label else [[n] for n in names]
    present = {t for row in tags for t in row}
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
    if order is not None:  # the same names in another order are other labels: not the same cache entry
        names = [f"{n}\0{'|'.join(str(index[t]) for t in row)}" for n, row in zip(names, tags, strict=True)]
    if multi_label:
        labels = np.zeros((len(paths), len(classes)), dtype=np.int64)
        for row, row_tags in enumerate(tags):
            labels[row, [index[t] for t in row_tags]] = 1
        # the same manifest read as single-label holds other labels: it must not share a cache entry
        fingerprint = _fingerprint(root, paths, [f"multi-label:{n}" for n in names], stamps, spans)
    else:
        labels = np.array([index[row[0]] for row in tags], dtype=np.int64)
        fingerprint = _fingerprint(root, paths, names, stamps, spans)
    return Dataset(
        root, paths, labels, classes, fingerprint, kind=kind, spans=spans, skipped_rows=tuple(notes), parts=parts
    )
