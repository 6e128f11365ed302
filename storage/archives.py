"""Safe extraction of zip and tar archives (uploaded datasets, storage/datasets.py), and the same limits for the tar
archives read in place (WebDataset shards, services/data/formats/webdataset.py: `BoundedReads`, `Limits`,
`archive_in`).

An archive is extracted member by member with our own checks, never with `extractall`: absolute names, `..`
components, links, devices and names that resolve outside the target are refused, and the bytes actually
written (not the sizes the headers claim) count against the size limit, so a zip bomb stops at the limit.
Knows nothing of HTTP: failures are `ArchiveError`s with a code the API maps to a status.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import io
import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CHUNK = 1 << 20
SKIPPED_TOP = {"__MACOSX"}  # resource forks that macOS's archiver adds; never part of a dataset
MAX_TAR_META = 1 << 20  # longest pax/GNU long-name header tarfile may read into memory
MAX_READ = max(CHUNK, MAX_TAR_META)  # no read of the tar stream is larger (extended headers, data chunks)
# Bad names and clashes between members: a broken archive, not a server fault.
_NAME_ERRNOS = {errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.EILSEQ}
# What the archive modules raise for damaged input (zlib and lzma errors are not OSErrors).
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    NotImplementedError,
    zlib.error,
    lzma.LZMAError,
    tarfile.TarError,
    zipfile.BadZipFile,
)


class ArchiveError(ValueError):
    """An upload that cannot become a dataset. `code`: invalid_archive, unsafe_archive, dataset_too_large or
    invalid_dataset; the message names the member or the cause."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Limits:
    max_bytes: int  # uncompressed bytes written, all members together
    max_files: int  # members (files and folders)


# What a member's first bytes say it is, where it is an archive or a compressed stream: (kind, (offset, bytes)...),
# each long enough that no text file (a label) starts so by chance
_ARCHIVE_MAGIC: tuple[tuple[str, tuple[tuple[int, bytes], ...]], ...] = (
    ("zip", ((0, b"PK\x03\x04"),)),
    ("zip", ((0, b"PK\x05\x06"),)),  # an empty zip
    ("gzip", ((0, b"\x1f\x8b\x08"),)),
    ("bzip2", ((0, b"BZh"), (4, b"1AY&SY"))),  # a block's magic after the level digit
    ("xz", ((0, b"\xfd7zXZ\x00"),)),
    ("zstd", ((0, b"(\xb5/\xfd"),)),
    ("7z", ((0, b"7z\xbc\xaf'\x1c"),)),
    ("rar", ((0, b"Rar!\x1a\x07"),)),
    ("tar", ((257, b"ustar\x0000"),)),  # POSIX
    ("tar", ((257, b"ustar  \x00"),)),  # GNU
)
ARCHIVE_HEAD = 265  # bytes of a member that `archive_in` reads


def archive_in(head: bytes) -> str | None:
    """The kind of archive (`zip`, `tar`, `gzip`, ...) a file starting with `head` (its first `ARCHIVE_HEAD` bytes,
    or all of a shorter file) is, by its content; None for anything else (images and videos among them)."""
    for kind, parts in _ARCHIVE_MAGIC:
        if all(head[at : at + len(magic)] == magic for at, magic in parts):
            return kind
    return None


# ---- extraction ---------------------------------------------------------------------------------------------
def member_parts(name: str) -> list[str]:
    """The path components of an archive member, or ArchiveError(unsafe_archive) for a name that could land
    outside the target. Backslashes count as separators: Windows archivers write them."""
    raw = name.replace("\\", "/")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise ArchiveError("unsafe_archive", f"member {name!r} has an absolute path")
    if "\x00" in raw:
        raise ArchiveError("unsafe_archive", f"member {name!r} has a NUL byte in its name")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError("unsafe_archive", f"member {name!r} has a `..` component")
    return parts


class _Writer:
    """Creates the members under `root`, counting members and bytes written against the limits."""

    def __init__(self, root: Path, limits: Limits) -> None:
        self.root, self.limits = root.resolve(), limits
        self.files = self.written = 0

    def target(self, name: str) -> Path | None:
        """Where a member goes (None: skipped), after counting it and checking its name."""
        self.files += 1
        if self.files > self.limits.max_files:
            raise ArchiveError("dataset_too_large", f"the archive has more than {self.limits.max_files} members")
        parts = member_parts(name)
        if not parts or parts[0] in SKIPPED_TOP:
            return None
        path = self.root.joinpath(*parts)
        # No member can create a link, so this only fails for names the checks above missed; kept as the last word.
        if not path.resolve().is_relative_to(self.root):
            raise ArchiveError("unsafe_archive", f"member {name!r} resolves outside the dataset folder")
        return path

    def claim(self, name: str, size: int) -> None:
        """Refuse early a member whose declared size cannot fit (the real count is in `copy`)."""
        if self.written + size > self.limits.max_bytes:
            raise self._too_large(name)

    def _too_large(self, name: str) -> ArchiveError:
        mb = self.limits.max_bytes / 2**20
        return ArchiveError("dataset_too_large", f"the extracted dataset exceeds {mb:g} MB (at member {name!r})")

    def mkdir(self, path: Path, name: str) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._bad_name(e, name) from None

    def copy(self, src: IO[bytes], path: Path, name: str) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # "x": a duplicate member is refused rather than silently replacing a file. Closed by the `with` below,
            # apart so that only creating it maps to a bad-name error.
            out = open(path, "xb")  # noqa: SIM115
        except OSError as e:
            raise self._bad_name(e, name) from None
        with out:
            while True:
                try:
                    chunk = src.read(CHUNK)
                except _READ_ERRORS as e:
                    raise ArchiveError("invalid_archive", f"member {name!r} cannot be read: {e}") from None
                if not chunk:
                    return
                self.written += len(chunk)
                if self.written > self.limits.max_bytes:
                    raise self._too_large(name)
                out.write(chunk)

    @staticmethod
    def _bad_name(e: OSError, name: str) -> Exception:
        if e.errno in _NAME_ERRNOS:
            return ArchiveError("invalid_archive", f"member {name!r} cannot be created: {e.strerror}")
        return e  # disk full, permissions: the server's problem, not the upload's


def _extract_zip(archive: Path, writer: _Writer) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except _READ_ERRORS as e:
        raise ArchiveError("invalid_archive", f"not a readable zip archive: {e}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > writer.limits.max_files:
            raise ArchiveError(
                "dataset_too_large",
                f"the archive has {len(infos)} members; at most {writer.limits.max_files} are accepted",
            )
        for info in infos:
            path = writer.target(info.filename)
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode) if info.create_system == 3 else 0  # unix attributes only mean something there
            if kind == stat.S_IFLNK:
                raise ArchiveError("unsafe_archive", f"member {info.filename!r} is a symbolic link")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveError("unsafe_archive", f"member {info.filename!r} is not a regular file or folder")
            if info.flag_bits & 0x1:
                raise ArchiveError("invalid_archive", f"member {info.filename!r} is encrypted")
            if path is None:
                continue
            if info.is_dir() or kind == stat.S_IFDIR:
                writer.mkdir(path, info.filename)
                continue
            writer.claim(info.filename, info.file_size)
            try:
                src = zf.open(info)
            except _READ_ERRORS as e:
                raise ArchiveError("invalid_archive", f"member {info.filename!r} cannot be read: {e}") from None
            with src:
                writer.copy(src, path, info.filename)


_COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}


class BoundedReads(io.RawIOBase):
    """A binary file as tarfile reads it, counted: a single read larger than `MAX_READ` is refused (tarfile reads a
    pax or GNU long-name header whole into memory, and a header may claim gigabytes), and so is reading more than
    `limit` bytes in all. `own`: closing this closes `raw` too."""

    def __init__(self, raw: IO[bytes], limit: int = 2**62, own: bool = True) -> None:
        self.raw, self.limit, self.count, self.own = raw, limit, 0, own

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > MAX_READ:
            raise ArchiveError("invalid_archive", f"a tar extended header of {n} bytes is too long (max {MAX_READ})")
        data = self.raw.read(n)
        self.count += len(data)
        if self.count > self.limit:
            raise ArchiveError("dataset_too_large", f"the archive holds more than {self.limit} bytes")
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        if self.own:
            self.raw.close()
        super().close()


class _TarReader(BoundedReads):
    """The decompressed bytes of a tar archive (plain, gzip, bzip2 or xz), read with `BoundedReads`' limits."""

    def __init__(self, archive: Path, limit: int) -> None:
        with open(archive, "rb") as f:
            head = f.read(6)
        opener = next((o for magic, o in _COMPRESSED.items() if head.startswith(magic)), None)
        super().__init__(opener(archive, "rb") if opener else open(archive, "rb"), limit)  # noqa: SIM115


def _open_tar(archive: Path, limit: int) -> tarfile.TarFile:
    reader = _TarReader(archive, limit)
    try:
        return tarfile.open(fileobj=reader, mode="r:")
    except BaseException:
        reader.close()
        raise


def _extract_tar(archive: Path, writer: _Writer) -> None:
    try:
        # decompressed bytes read: the data (limited by the writer) and a header block or two per member
        tf = _open_tar(archive, writer.limits.max_bytes + writer.limits.max_files * 2048 + MAX_READ)
    except ArchiveError:
        raise
    except _READ_ERRORS as e:
        raise ArchiveError("invalid_archive", f"not a zip or tar archive ({e})") from None
    with tf, tf.fileobj:
        members = iter(tf)
        while True:
            try:
                member = next(members, None)
            except ArchiveError:
                raise
            except _READ_ERRORS as e:
                raise ArchiveError("invalid_archive", f"the tar archive is damaged: {e}") from None
            if member is None:
                return
            name = member.name
            path = writer.target(name)
            if member.issym() or member.islnk():
                kind = "symbolic" if member.issym() else "hard"
                raise ArchiveError("unsafe_archive", f"member {name!r} is a {kind} link (to {member.linkname!r})")
            if not (member.isreg() or member.isdir()):
                raise ArchiveError("unsafe_archive", f"member {name!r} is a device, FIFO or other special file")
            # Skipped members are read past too (decompressed): their declared size counts as well.
            writer.claim(name, member.size)
            if path is None:
                continue
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the standard library's own checks, as well
                try:
                    tarfile.data_filter(member, str(writer.root))
                except tarfile.FilterError as e:
                    raise ArchiveError("unsafe_archive", f"member {name!r}: {e}") from None
            if member.isdir():
                writer.mkdir(path, name)
                continue
            try:
                src = tf.extractfile(member)
            except _READ_ERRORS as e:
                raise ArchiveError("invalid_archive", f"member {name!r} cannot be read: {e}") from None
            assert src is not None  # a regular file always has data
            with src:
                writer.copy(src, path, name)


def archive_kind(archive: Path) -> str:
    """`zip` or `tar` by the content (names lie); ArchiveError(invalid_archive) for anything else."""
    with open(archive, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        return "zip"
    try:
        with _open_tar(archive, 2**40) as tf, tf.fileobj:
            return "tar"
    except ArchiveError:
        raise
    except _READ_ERRORS as e:
        raise ArchiveError("invalid_archive", f"not a zip or tar archive (.zip, .tar, .tar.gz, .tgz): {e}") from None


def extract(archive: Path, dest: Path, limits: Limits) -> None:
    """Extract a zip or tar archive into the folder `dest` (created; it must not exist)."""
    kind = archive_kind(archive)
    dest.mkdir(parents=True)
    writer = _Writer(dest, limits)
    (_extract_zip if kind == "zip" else _extract_tar)(archive, writer)
    if writer.files == 0:
        raise ArchiveError("invalid_archive", "the archive is empty")
