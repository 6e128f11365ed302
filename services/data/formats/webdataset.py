"""WebDataset shards: uncompressed tar files, named one by one or by a brace pattern (`shards/{000000..000009}.tar`,
formats/braces.py), read with the standard `tarfile` by the format's conventions (https://github.com/webdataset/
webdataset, "The WebDataset Format"): a sample is the consecutive files of a shard that share a key, the file's path
up to the first dot of its base name; the rest of the name, its extension, says what the file holds. Here a sample's
image or video is its first file whose extension is among the media keys (`jpg`, `png`, ..., `mp4`, ...), and its
label is the text of its `.cls` file (a class index, or a class name) or a field of its `.json` file
(`label_key`, `label_field`; multi-label: a list of tags, or `|`-separated tags).

Samples are not extracted: each is a `ShardMember` (its shard, offset and size; a million of them kept as arrays:
formats/members.py), which the loader processes read by seeking, so a shard is read twice (listed once, when the job is
planned, its labels with it; each image when it is decoded) and never copied. Shards in an object store
(`s3://bucket/shards/{000000..000009}.tar`, each under an allowed prefix) are read the same way through fsspec
(formats/remote.py): listed by streaming through the object with a read-ahead buffer, a loader's batch of members then
read by one ranged request per run of them close together in a shard (formats/samples.py: `read_together`); a store
outage is retried, then fails the job naming the shard (StoreUnavailable), never taken for a shard cut short.

A shard cut short (its last sample, or tar's end-of-archive blocks, missing) fails the
job naming it, or with `on_corrupt: skip` is left out whole and noted, like a sample without its image or label.

A shard is an archive, so it gets the limits an uploaded archive has (storage/archives.py; `ReadOptions.limits`, the
server's SIDETUNE_MAX_DATASET_FILES and SIDETUNE_MAX_DATASET_MB for a job): no read of its tar headers larger than
`MAX_READ` (a pax header claiming gigabytes), at most `max_files` members (tarfile keeps each member's header in
memory while listing); and a sample's image or video no larger than `max_bytes` (a loader reads it whole) and not an
archive itself (zip, tar, gzip, ... by its first bytes: nothing inside a shard is unpacked). A shard over the first
two fails the job naming it (or is left out), a sample over the last two names its shard and member (or is left
out). Nothing in a shard is decompressed, so there is no ratio to bound.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import fsspec

from services.data.formats import remote
from services.data.formats.base import DatasetFormat, Inside, ReadOptions, WebDatasetOptions
from services.data.formats.braces import PatternError, expand, is_shards
from services.data.formats.build import finish
from services.data.formats.columns import Labels
from services.data.formats.left_out import SHARD, UNUSABLE, Notes
from services.data.formats.members import KEY, MembersBuilder, Shard, base
from services.data.formats.samples import Dataset, DatasetError, ShardMember
from storage.archives import ARCHIVE_HEAD, ArchiveError, BoundedReads, Limits, archive_in
from storage.faults import is_store_outage

_BLOCK = 512
MAX_LABEL_BYTES = 1 << 20  # a label file is text; a larger one is not read


class ShardError(Exception):
    """A shard that cannot be read to its end (cut short, compressed, not a tar file)."""


@dataclass
class _Sample:
    """A sample being gathered: its files by extension, and the label file's bytes once read."""

    key: str
    files: dict[str, ShardMember] = field(default_factory=dict)
    label: bytes | None = None
    archives: dict[str, str] = field(default_factory=dict)  # a media file's extension -> the archive it is


def _members(
    shard: Shard, f: IO[bytes], options: WebDatasetOptions, limits: Limits | None
) -> Iterator[tuple[str, str, ShardMember, bytes | None, str | None]]:
    """(key, extension, member, the label file's bytes or None, the archive a media file is or None) for each
    regular file of `shard` (open as `f`), in order; ShardError if the shard does not read to its end or passes
    `limits`' member count or tar's header size. A store outage is raised as it comes."""
    end = 0
    media = set(options.media_keys)
    try:
        if f.read(2) == b"\x1f\x8b":
            raise ShardError("it is gzip-compressed; samples are read in place, so shards must be plain .tar files")
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        with tarfile.open(fileobj=BoundedReads(f, own=False), mode="r:") as tar:
            for count, info in enumerate(tar, 1):
                if limits is not None and count > limits.max_files:
                    raise ShardError(
                        f"it has more than {limits.max_files:,} members (at {info.name!r}), more than an uploaded "
                        "archive may hold (SIDETUNE_MAX_DATASET_FILES); write smaller shards"
                    )
                end = info.offset_data + -(-info.size // _BLOCK) * _BLOCK
                match = KEY.match(info.name) if info.isfile() else None
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                label = kind = None
                if ext == options.label_key.lower() and info.size <= MAX_LABEL_BYTES:
                    reader = tar.extractfile(info)
                    label = reader.read() if reader is not None else None
                elif ext in media:  # its first bytes, from the buffer the listing reads anyway
                    f.seek(info.offset_data)
                    kind = archive_in(f.read(min(info.size, ARCHIVE_HEAD)))
                yield key, ext, ShardMember(shard, info.name, info.offset_data, info.size), label, kind
        f.seek(end)  # tar ends with two zero blocks: without them the shard was cut at a file's end
        tail = f.read(2 * _BLOCK)
    except ArchiveError as e:
        raise ShardError(f"{e.message}, more than an uploaded archive may have") from None
    except tarfile.ReadError as e:
        raise ShardError(f"it is cut short, or is not a tar file (tarfile: {e})") from None
    except OSError as e:
        if is_store_outage(e):  # aiohttp's lost connections are OSErrors too: not the shard's fault
            raise
        raise ShardError(f"it cannot be read ({e.strerror or e})") from None
    if end > size or len(tail) < 2 * _BLOCK or tail.strip(b"\0"):
        raise ShardError("it is cut short (it ends without tar's end-of-archive blocks)")


def _gather(shard: Shard, f: IO[bytes], options: WebDatasetOptions, limits: Limits | None) -> list[_Sample]:
    """The samples of `shard` (open as `f`), in order; DatasetError for a key split across the shard."""
    out: list[_Sample] = []
    seen: set[str] = set()
    for key, ext, member, label, kind in _members(shard, f, options, limits):
        if not out or out[-1].key != key:
            if key in seen:
                raise DatasetError(
                    f"{shard}: the files of sample {key!r} are not next to each other (a sample's files are "
                    "consecutive in a WebDataset shard)"
                )
            seen.add(key)
            out.append(_Sample(key))
        out[-1].files.setdefault(ext, member)
        if label is not None:
            out[-1].label = label
        if kind is not None:
            out[-1].archives.setdefault(ext, kind)
    return out


def _samples(shard: Shard, options: WebDatasetOptions, limits: Limits | None) -> list[_Sample]:
    """The samples of `shard`, streamed through once: a local file, or an object read by ranges (an outage retried
    from the start of the shard, then StoreUnavailable naming it)."""
    if isinstance(shard, str):

        def listing(fs: fsspec.AbstractFileSystem, path: str) -> list[_Sample]:
            with remote.open_object(fs, path) as f:
                return _gather(shard, f, options, limits)

        return remote.call(shard, "shard", listing, keep=(ShardError, DatasetError))
    try:
        with open(shard, "rb") as f:
            return _gather(shard, f, options, limits)
    except OSError as e:
        raise ShardError(f"it cannot be read ({e.strerror or e})") from None


def _name(value: object, options: WebDatasetOptions) -> str:
    """A label value as a class name: an index into `classes` (an int, or a decimal text when classes are given)
    or a name (among `classes` when given); ValueError saying what is wrong."""
    classes = options.classes
    if isinstance(value, str) and classes is not None and value.strip().isdecimal():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"label {value!r} is neither a class index nor a class name")
    if isinstance(value, int):
        if classes is None:
            return str(value)
        if not 0 <= value < len(classes):
            raise ValueError(f"label {value} is not an index of dataset.webdataset.classes ({len(classes)} classes)")
        return classes[value]
    name = value.strip()
    if not name:
        raise ValueError("the label is empty")
    if classes is not None and name not in classes:
        raise ValueError(f"label {name!r} is not one of dataset.webdataset.classes")
    return name


def _label(raw: bytes, options: WebDatasetOptions, multi_label: bool) -> str:
    """The class name (multi-label: `|`-joined tags) a label file holds; ValueError saying what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"the .{options.label_key} file is not UTF-8 text") from None
    if options.label_key.lower() == "json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"the .json file is not JSON ({e})") from None
        if not isinstance(document, dict) or options.label_field not in document:
            raise ValueError(f"its .json file has no field {options.label_field!r} (dataset.webdataset.label_field)")
        value = document[options.label_field]
    else:
        value = text.strip()
    if multi_label:
        tags = value if isinstance(value, list) else value.split("|") if isinstance(value, str) else [value]
        names = [_name(t, options) for t in tags if not (isinstance(t, str) and not t.strip())]
        if not names:
            raise ValueError(f"an empty tag list {value!r}")
        return "|".join(names)
    return _name(value, options)


def _sample_row(sample: _Sample, options: ReadOptions) -> tuple[ShardMember, str]:
    """A sample's (item, label); ValueError naming what it lacks, or the member that passes the limits."""
    wds, limits = options.webdataset, options.limits
    key = next((k for k in wds.media_keys if k in sample.files), None)
    if key is None:
        raise ValueError(
            f"no image or video (none of the extensions {', '.join(wds.media_keys[:6])}, ...; "
            f"it has {', '.join(sorted(sample.files))})"
        )
    media = sample.files[key]
    if key in sample.archives:
        raise ValueError(
            f"its {media.member} is a {sample.archives[key]} archive, not an image or video (an archive inside a "
            "shard is never unpacked)"
        )
    if limits is not None and media.size > limits.max_bytes:
        raise ValueError(
            f"its {media.member} is {media.size:,} bytes, more than an uploaded dataset may hold "
            f"({limits.max_bytes:,} bytes, SIDETUNE_MAX_DATASET_MB)"
        )
    if sample.label is None:
        raise ValueError(f"no label (no .{wds.label_key} file; dataset.webdataset.label_key)")
    if (kind := archive_in(sample.label[:ARCHIVE_HEAD])) is not None:
        raise ValueError(f"its .{wds.label_key} file is a {kind} archive, not a label")
    return media, _label(sample.label, wds, options.multi_label)


def missing_shards(location: str, shards: list[Shard]) -> DatasetError | None:
    """The error for shards of `location` that do not exist, or None (objects in a store listed a folder at a
    time)."""
    urls = [s for s in shards if isinstance(s, str)]
    found = remote.stat_many(urls, "shard") if urls else {}
    missing = [s for s in shards if (s not in found if isinstance(s, str) else not s.is_file())]
    if not missing:
        return None
    if len(missing) == len(shards):
        return DatasetError(f"{location!r} matches no file: none of the {len(shards)} shard(s) it names exists")
    listed = ", ".join(str(s) for s in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return DatasetError(f"{len(missing)} of the {len(shards)} shards {location!r} names do not exist: {listed}")


def read_webdataset(
    location: str, shards: list[Shard], options: ReadOptions | None = None, inside: Inside | None = None
) -> Dataset:
    """The samples of `shards` (what `location` names), in shard order then file order. With `inside`, every
    shard is checked by it before it is looked at."""
    options = options or ReadOptions()
    if inside is not None:
        for shard in shards:
            inside(shard, f"shard {shard}")
    if error := missing_shards(location, shards):
        raise error
    wds, skip = options.webdataset, options.skip_bad
    items = MembersBuilder()
    names = Labels()
    skipped = Notes()
    for shard in shards:
        try:
            samples = _samples(shard, wds, options.limits)
        except ShardError as e:
            if not skip:
                raise DatasetError(f"shard {shard}: {e} (set dataset.on_corrupt='skip' to leave it out)") from None
            skipped.add(SHARD, f"shard {base(shard)}: {e}, left out")
            continue
        for sample in samples:
            try:
                item, name = _sample_row(sample, options)
            except ValueError as e:
                if not skip:
                    raise DatasetError(
                        f"shard {shard} sample {sample.key!r}: {e} (set dataset.on_corrupt='skip' to leave such "
                        "samples out)"
                    ) from None
                skipped.add(UNUSABLE, f"shard {base(shard)} sample {sample.key}: {e}, left out")
                continue
            items.add(item)
            names.append(name)
    urls = [s for s in shards if isinstance(s, str)]
    root = remote.common_folder(urls) if urls else Path(os.path.commonpath([Path(s).parent for s in shards]))
    members = items.build()
    where = members.where()
    left_out = skipped.build()
    return finish(root, members, names, where, options.duplicates, left_out, None, options.multi_label, "labels")


class WebDataset(DatasetFormat):
    name = "webdataset"

    def claims(self, location: str) -> bool:
        return is_shards(location)

    def locations(self, location: str) -> list[str]:
        try:
            return expand(location)
        except PatternError as e:
            raise DatasetError(str(e)) from None

    def read(self, location: str, files: list[Path | str], options: ReadOptions, inside: Inside | None) -> Dataset:
        return read_webdataset(location, files, options, inside)
