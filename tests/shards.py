"""WebDataset shards written with the standard `tarfile`, as the format's writers lay them out (each sample's files
consecutive, named `<key>.<extension>`), for the tests of services/data/formats/webdataset.py and of extraction."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

Sample = tuple[str, dict[str, bytes]]  # (key, {extension: the file's bytes})


def write_shard(path: Path, samples: Sequence[Sample]) -> Path:
    """One uncompressed shard holding `samples` in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    return path


def write_shards(folder: Path, samples: Sequence[Sample], per_shard: int) -> str:
    """`samples` split over shards `folder/000000.tar`, ... of `per_shard` samples each; returns the brace pattern
    naming them all."""
    count = -(-len(samples) // per_shard)
    for i in range(count):
        write_shard(folder / f"{i:06d}.tar", samples[i * per_shard : (i + 1) * per_shard])
    return f"{folder}/{{000000..{count - 1:06d}}}.tar"


def imagefolder_samples(paths: Sequence[Path], classes: Sequence[str], labels: Sequence[int]) -> list[Sample]:
    """The samples of an ImageFolder's files in its order: each file's bytes under its own suffix, its class name
    as the `.cls` file."""
    return [
        (f"{classes[label]}_{p.stem}", {p.suffix.lstrip(".").lower(): p.read_bytes(), "cls": classes[label].encode()})
        for p, label in zip(paths, labels, strict=True)
    ]
