"""Datasets in an object store: reading objects named by fsspec URLs (`s3://bucket/shards/000000.tar`, `gs://...`),
for the formats that take them (WebDataset shards, manifests and their rows).

Objects are read where they are, by ranges (a shard is listed by streaming through it, a manifest read through a
range at a time, a sample read by its offset and size; a loader's batch of objects fetched together), never copied
whole to the local disk. Credentials are the filesystem's own (s3fs: the `AWS_*` variables,
`AWS_PROFILE`, `AWS_ENDPOINT_URL` for an S3-compatible server, as the store uses them: storage/store.py), never
part of a URL (services/paths.py refuses such URLs before anything is read), and every message built here is
scrubbed of the secrets the environment holds. A store outage (storage/faults.py: `is_store_outage`) is retried by
the store's policy within the read (`IN_CALL`); what outlasts it is `StoreUnavailable` naming the object, which a job
step hands to the task layer to retry the step (`TASK`), so a lasting outage fails the job naming it. Torch-free.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import fsspec

from storage.faults import StoreUnavailable, is_store_outage, retrying

T = TypeVar("T")

# environment variables whose values never appear in a message (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, ...)
_SECRET_NAMES = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL|API_KEY", re.IGNORECASE)


def scrub(text: str) -> str:
    """`text` without the values of the environment's secrets (keys, tokens, passwords of any library)."""
    for name, value in os.environ.items():
        if len(value) >= 4 and _SECRET_NAMES.search(name) and value in text:
            text = text.replace(value, "[redacted]")
    return text


@dataclass(frozen=True)
class ObjectInfo:
    """What says an object changed: its size and its version (the ETag, else the modification time)."""

    size: int
    version: str


def info_of(entry: Mapping[str, object]) -> ObjectInfo:
    version = entry.get("ETag") or entry.get("etag") or entry.get("LastModified") or entry.get("mtime") or ""
    return ObjectInfo(int(entry.get("size") or 0), str(version).strip('"'))


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url)


def _outage(url: str, what: str, e: BaseException) -> StoreUnavailable:
    detail = scrub(f"{type(e).__name__}: {e}")[:300]
    return StoreUnavailable(f"{what} {url}: the object store did not answer, after retries ({detail})")


def call(
    url: str,
    what: str,
    fn: Callable[[fsspec.AbstractFileSystem, str], T],
    keep: tuple[type[BaseException], ...] = (),
) -> T:
    """`fn(filesystem, path)` for the object at `url`, an outage retried (`IN_CALL`), then StoreUnavailable naming
    `what` and `url`; FileNotFoundError and the errors in `keep` (the caller's own: a shard cut short) stay
    themselves; any other failure (refused credentials, a missing package) is StoreUnavailable too, scrubbed:
    retrying the step may see it pass, and its cause is the operator's to fix."""
    try:
        return retrying(lambda: fn(*_fs(url)), f"reading {what} {url}")
    except (FileNotFoundError, *keep):
        raise
    except ImportError as e:
        raise StoreUnavailable(f"{what} {url}: no filesystem for this URL is installed ({scrub(str(e))})") from None
    except Exception as e:  # s3fs raises botocore's and aiohttp's errors, and PermissionError for refused keys
        if isinstance(e, StoreUnavailable):
            raise StoreUnavailable(scrub(str(e))) from None
        if is_store_outage(e):
            raise _outage(url, what, e) from None
        raise StoreUnavailable(scrub(f"{what} {url} cannot be read: {type(e).__name__}: {e}")[:500]) from None


def stat(url: str, what: str = "object") -> ObjectInfo:
    """The object's size and version; FileNotFoundError if it does not exist."""
    return call(url, what, lambda fs, path: info_of(fs.info(path)))


def stat_many(urls: Iterable[str], what: str = "object") -> dict[str, ObjectInfo]:
    """Size and version of each of `urls` that exists, by listing each folder once (not one request per object)."""
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        by_folder.setdefault(posixpath.dirname(url), []).append(url)
    found: dict[str, ObjectInfo] = {}
    for members in by_folder.values():
        try:  # named by its first object in messages: the folder is no part of the dataset
            listing = call(members[0], what, lambda fs, path: fs.ls(posixpath.dirname(path), detail=True))
        except FileNotFoundError:
            continue
        names = {posixpath.basename(str(e["name"]).rstrip("/")): e for e in listing if e.get("type") != "directory"}
        for url in members:
            entry = names.get(posixpath.basename(url))
            if entry is not None:
                found[url] = info_of(entry)
    return found


def read_range(url: str, start: int, size: int, what: str = "object") -> bytes:
    """`size` bytes of the object from `start` (one ranged request)."""
    return call(url, what, lambda fs, path: fs.cat_file(path, start=start, end=start + size))


def read_all(url: str, what: str = "object") -> bytes:
    return call(url, what, lambda fs, path: fs.cat_file(path))


def read_many(urls: Sequence[str], what: str = "object") -> dict[str, bytes]:
    """The bytes of each of `urls` (a loader's batch of objects), fetched together: one filesystem call per scheme,
    which an asynchronous filesystem (s3fs, gcsfs) answers with its requests in flight at once, one GET an object
    (a range from 0: no HEAD for its size). By URL; an object that could not be read (gone, an outage, the call
    itself failing) is left out, for its own read (`read_all`: retried, then named) to say what is wrong."""
    by_scheme: dict[str, list[str]] = {}
    for url in urls:
        by_scheme.setdefault(url.partition("://")[0], []).append(url)
    out: dict[str, bytes] = {}
    for group in by_scheme.values():
        try:
            fs = _fs(group[0])[0]
            got = fs.cat_ranges([_fs(u)[1] for u in group], 0, None, on_error="return")
        except Exception:  # noqa: BLE001 - whatever it was, each object's own read retries it and names it
            continue
        out.update((url, data) for url, data in zip(group, got, strict=True) if isinstance(data, bytes))
    return out


class _Ranges(io.RawIOBase):
    """An object of `size` bytes read `chunk` bytes at a time (`read_range`: each retried as `call` retries, then
    StoreUnavailable naming it), so that reading it through holds one chunk in memory, not the object, and costs a
    request per chunk, however small the reads its reader makes."""

    def __init__(self, url: str, size: int, what: str, chunk: int) -> None:
        self.url, self.size, self.what, self.chunk = url, size, what, chunk
        self.pos = 0  # where the next chunk starts
        self.held, self.at = memoryview(b""), 0  # the chunk read last, and how much of it was given out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.at >= len(self.held):
            n = min(self.chunk, self.size - self.pos)
            data = read_range(self.url, self.pos, n, self.what) if n > 0 else b""
            # an object cut short since its size was read ends where it ends
            self.pos = self.pos + len(data) if data else self.size
            self.held, self.at = memoryview(data), 0
        k = min(len(buffer), len(self.held) - self.at)
        buffer[:k] = self.held[self.at : self.at + k]
        self.at += k
        return k


def open_text(url: str, what: str = "object", chunk: int = 8 << 20) -> IO[str]:
    """The object's text (UTF-8, a byte-order mark dropped, newlines as written, for `csv`), streamed: one ranged
    request per `chunk` bytes, each retried; FileNotFoundError if it does not exist."""
    size = stat(url, what).size
    return io.TextIOWrapper(io.BufferedReader(_Ranges(url, size, what, chunk)), encoding="utf-8-sig", newline="")


def open_object(fs: fsspec.AbstractFileSystem, path: str, block_size: int = 8 << 20) -> IO[bytes]:
    """An object as a seekable binary file read by ranges of `block_size` (a read-ahead buffer in memory, never the
    whole object on disk); inside `call`, which retries and names it."""
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")


def join(folder: str, rel: str) -> str:
    """`rel` (a manifest's row) under the URL `folder`; `..` segments collapsed (the prefix rule sees the result)."""
    prefix, _, rest = folder.partition("://")
    return f"{prefix}://{posixpath.normpath(posixpath.join(rest, rel))}"


def parent(url: str) -> str:
    prefix, _, rest = url.partition("://")
    return f"{prefix}://{posixpath.dirname(rest)}"


def common_folder(urls: list[str]) -> str:
    """The deepest folder holding all of `urls` (of one scheme)."""
    prefix = urls[0].partition("://")[0]
    return f"{prefix}://{posixpath.commonpath([posixpath.dirname(u.partition('://')[2]) for u in urls])}"
