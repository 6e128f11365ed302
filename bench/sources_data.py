"""The data bench/sources.py reads: many items in each format planning reads (a manifest of distinct files, the same
files as an ImageFolder, WebDataset shards, Hugging Face Parquet shards: planning's load), the same photos in every
dataset format (ImageFolder, CSV and JSONL manifests, WebDataset shards, Hugging Face Parquet and `save_to_disk`; and
in an S3-compatible store the shards, the photos with a CSV manifest of their URLs, and the Parquet shards), and that
store: moto in server mode, a process on a loopback port.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

from common import say

PER_FOLDER = 1000  # files per folder of the many-files manifest
BUCKET = "sidetune-bench"


def write_many(root: Path, rows: int, classes: int = 10) -> Path:
    """A CSV manifest `root/rows.csv` of `rows` rows, each a distinct empty file `img/<folder>/<i>.png` (planning
    reads names, links and stats, not pixels; each file its own inode, so none is a repeat). Kept when already
    there with as many rows."""
    manifest = root / "rows.csv"
    done = root / f".rows-{rows}"
    if done.exists() and manifest.exists():
        return manifest
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    with manifest.open("w") as f:
        f.write("path,label\n")
        for folder in range(-(-rows // PER_FOLDER)):
            sub = root / "img" / f"{folder:05d}"
            sub.mkdir(parents=True, exist_ok=True)
            lines = []
            for i in range(folder * PER_FOLDER, min(rows, (folder + 1) * PER_FOLDER)):
                name = f"{i:07d}.png"
                os.close(os.open(sub / name, os.O_CREAT | os.O_WRONLY, 0o644))
                lines.append(f"img/{folder:05d}/{name},class{i % classes}\n")
            f.writelines(lines)
    done.touch()
    say(f"manifest: {rows:,} distinct files written in {time.perf_counter() - start:.1f}s")
    return manifest


def many_folder(manifest: Path) -> Path:
    """The files of `write_many`'s manifest as an ImageFolder: its `img/` folder, whose `PER_FOLDER` subfolders are
    the classes (so `rows` of at least 2 x PER_FOLDER give two classes)."""
    return manifest.parent / "img"


def write_many_shards(root: Path, rows: int) -> str:
    """`rows` WebDataset samples (a few bytes of `.png` and a `.cls` label each) in shards of `PER_FOLDER`, under
    `root`: their brace pattern. One shard is written and copied (each copy its own inode: other samples, the same
    keys). Kept when already there with as many rows."""
    count = -(-rows // PER_FOLDER)
    pattern = f"{root}/{{000000..{count - 1:06d}}}.tar"
    done = root / f".rows-{rows}"
    if done.exists():
        return pattern
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    samples = [(f"{i:07d}", {"png": b"\x89PNG\r\n\x1a\n", "cls": str(i % 10).encode()}) for i in range(PER_FOLDER)]
    _shard(root / "000000.tar", samples)
    for i in range(1, count):
        shutil.copyfile(root / "000000.tar", root / f"{i:06d}.tar")
    if rows % PER_FOLDER:  # the last shard holds the rest
        _shard(root / f"{count - 1:06d}.tar", samples[: rows % PER_FOLDER])
    done.touch()
    say(f"WebDataset: {rows:,} samples in {count} shards written in {time.perf_counter() - start:.1f}s")
    return pattern


def write_many_parquet(root: Path, rows: int, files: int = 10, classes: int = 10) -> Path:
    """A Hugging Face dataset of `rows` rows in `files` Parquet shards `root/data/train-0000i-of-000nn.parquet` (as
    `push_to_hub` lays them out: an Image feature, a tiny PNG each, and a ClassLabel), written by pyarrow with the
    features' schema, in row groups of 1,000 rows. Kept when already there with as many rows."""
    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = root / f".rows-{rows}"
    if done.exists():
        return root
    start = time.perf_counter()
    (root / "data").mkdir(parents=True, exist_ok=True)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"class{i}" for i in range(classes)])}
    )
    png = b"\x89PNG\r\n\x1a\n" + bytes(56)  # planning reads no pixels
    per = -(-rows // files)
    for f in range(files):
        ids = range(f * per, min(rows, (f + 1) * per))
        image = pa.StructArray.from_arrays(
            [pa.array([png] * len(ids), pa.binary()), pa.array([f"{i:07d}.png" for i in ids], pa.string())],
            names=["bytes", "path"],
        )
        label = pa.array(np.arange(ids.start, ids.stop, dtype=np.int64) % classes)
        table = pa.Table.from_arrays([image, label], schema=features.arrow_schema)
        pq.write_table(table, root / "data" / f"train-{f:05d}-of-{files:05d}.parquet", row_group_size=1000)
    done.touch()
    say(f"Parquet: {rows:,} rows in {files} files written in {time.perf_counter() - start:.1f}s")
    return root


def _shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """One uncompressed tar shard by WebDataset's conventions: each sample's files consecutive, `<key>.<ext>`."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


def write_formats(base: Path, folder: Path, per_shard: int) -> dict[str, str]:
    """The photos of the ImageFolder `folder` (under `base`) in every local format, in the folder's order:
    {source: its dataset.path}. Hugging Face's only where `datasets` is installed."""
    from services.data.datasets import read_imagefolder

    ds = read_imagefolder(folder)
    rel = [p.relative_to(base).as_posix() for p in ds.paths]
    names = [ds.classes[i] for i in ds.labels.tolist()]
    out = {"imagefolder": str(folder)}
    (base / "rows.csv").write_text("path,label\n" + "".join(f"{r},{n}\n" for r, n in zip(rel, names, strict=True)))
    out["csv"] = str(base / "rows.csv")
    lines = (json.dumps({"path": r, "label": n}) + "\n" for r, n in zip(rel, names, strict=True))
    (base / "rows.jsonl").write_text("".join(lines))
    out["jsonl"] = str(base / "rows.jsonl")
    samples = [
        (f"{n}_{p.stem}", {p.suffix.lstrip(".").lower(): p.read_bytes(), "cls": n.encode()})
        for p, n in zip(ds.paths, names, strict=True)
    ]
    shards = base / "shards"
    shards.mkdir(exist_ok=True)
    count = -(-len(samples) // per_shard)
    for i in range(count):
        _shard(shards / f"{i:06d}.tar", samples[i * per_shard : (i + 1) * per_shard])
    out["wds local"] = f"{shards}/{{000000..{count - 1:06d}}}.tar"
    try:
        import datasets
    except ImportError:
        say("no `datasets` installed: the Hugging Face sources are left out")
        return out
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=ds.classes)})
    images = [{"bytes": p.read_bytes(), "path": p.name} for p in ds.paths]
    table = datasets.Dataset.from_dict({"image": images, "label": ds.labels.tolist()}, features=features)
    table.to_parquet(str(base / "parquet" / "train.parquet"))
    table.save_to_disk(str(base / "saved"))
    out["hf parquet"], out["hf save_to_disk"] = str(base / "parquet"), str(base / "saved")
    return out


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """An S3-compatible server (moto) on loopback, with a bucket; the `AWS_*` variables of this process (and of
    the loader processes it starts) point at it. Yields `s3://<bucket>`."""
    import httpx

    from worker.launcher import free_port

    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out
        )
        endpoint = f"http://127.0.0.1:{port}"
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        before = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(endpoint, timeout=1)
                    break
                except httpx.TransportError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"moto did not start (see {log})") from None
                    time.sleep(0.1)
            httpx.put(f"{endpoint}/{BUCKET}", timeout=10).raise_for_status()
            yield f"s3://{BUCKET}"
        finally:
            proc.terminate()
            proc.wait(10)
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def upload_shards(pattern: str, bucket: str) -> str:
    """The local shards of `pattern` copied into `bucket`; their pattern there."""
    import fsspec

    folder, name = pattern.rsplit("/", 1)
    fs, path = fsspec.core.url_to_fs(f"{bucket}/shards")
    for shard in sorted(Path(folder).glob("*.tar")):
        fs.put_file(str(shard), f"{path}/{shard.name}")
    return f"{bucket}/shards/{name}"


def upload_sources(sources: dict[str, str], base: Path, bucket: str) -> dict[str, str]:
    """The sources in the store besides the shards, from the local ones under `base`: the photos with a CSV manifest
    of their URLs (`csv s3`, the manifest in the store too), and the Hugging Face Parquet shards (`hf parquet s3`,
    their folder URL) where they were written. {source: its dataset.path}."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{bucket}/photos")
    lines = (base / "rows.csv").read_text().splitlines()
    urls = ["path,label"]
    for line in lines[1:]:
        rel, label = line.rsplit(",", 1)
        fs.put_file(str(base / rel), f"{path}/{rel}")
        urls.append(f"{bucket}/photos/{rel},{label}")
    fs.pipe_file(f"{path}/urls.csv", ("\n".join(urls) + "\n").encode())
    out = {"csv s3": f"{bucket}/photos/urls.csv"}
    if "hf parquet" in sources:
        fs.put(sources["hf parquet"], f"{path}/parquet", recursive=True)
        out["hf parquet s3"] = f"{bucket}/photos/parquet/"
    return out
