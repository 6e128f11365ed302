"""A manifest's rows as compact columns (services/data/formats/columns.py): a `Files` column reads as the list of
paths it stands for (indexing, slices, iteration, equality, pickling to the loader processes), the `Resolver` resolves
as `Path.resolve()` does (links, `..`, missing files), and a manifest read into columns keeps the fingerprint written
by the documented formula (so the feature cache's keys of existing datasets are unchanged), its repeats and links
dropped as before."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from services.data.datasets import read_csv, read_dataset, read_imagefolder
from services.data.formats.columns import Files, Resolver


def test_a_files_column_reads_as_its_list_of_paths(tmp_path: Path) -> None:
    paths = [tmp_path / f"d{i % 3}" / f"{i}.png" for i in range(7)] + [tmp_path / "caf\u00e9.png"]
    files = Files.of(paths)
    assert len(files) == 8 and files[0] == paths[0] and files[-1] == paths[-1] and files[np.int64(3)] == paths[3]
    assert files[2:5] == paths[2:5] and files[::3] == paths[::3] and list(files) == paths
    assert files == paths and paths == files and files != paths[:-1] and files.index(paths[4]) == 4
    assert pickle.loads(pickle.dumps(files)) == files and [str(p) for p in files] == list(files.texts())
    assert np.asarray(files, dtype=object)[[1, 6]].tolist() == [paths[1], paths[6]]
    assert files.take(np.array([1, 6])) == [paths[1], paths[6]]
    with pytest.raises(IndexError):
        files[8]


def test_the_resolver_resolves_as_path_resolve(tmp_path: Path) -> None:
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "a.png").write_bytes(b"a")
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "b.png").symlink_to(tmp_path / "real" / "a.png")
    resolver = Resolver()
    for rel in ("real/a.png", "linked/a.png", "linked/b.png", "linked/sub/../a.png", "real/missing.png", "real/."):
        path = str(tmp_path / rel)
        real, st = resolver.resolve(path)
        assert real == str(Path(path).resolve()), rel
        assert (st is not None) == Path(path).exists(), rel
    assert resolver.resolve(str(tmp_path / "linked" / "b.png"))[1].st_ino == (tmp_path / "real" / "a.png").stat().st_ino


def _formula(root: Path, rows: list[tuple[Path, str]]) -> str:
    """The fingerprint as formats/build.py documents it: each row's name under the root, label, size and mtime."""
    h = hashlib.sha256()
    for path, label in rows:
        st = path.stat()
        h.update(f"{path.relative_to(root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def test_a_manifest_in_columns_keeps_its_fingerprint_and_drops_repeats(tmp_path: Path) -> None:
    for i in range(6):
        (tmp_path / "img" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "img" / f"c{i % 2}" / f"{i}.png").write_bytes(bytes([i]) * (i + 1))
    os.symlink(tmp_path / "img" / "c0" / "0.png", tmp_path / "img" / "link.png")
    rows = [(f"img/c{i % 2}/{i}.png", f"c{i % 2}") for i in range(6)]
    lines = [*rows, ("./img/c0/0.png", "c0"), ("img/link.png", "c0"), ("img/c1/../c1/1.png", "c1")]
    manifest = tmp_path / "rows.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in lines))
    ds = read_csv(manifest)
    assert isinstance(ds.paths, Files) and len(ds) == 6 and ds.classes == ["c0", "c1"]
    assert ds.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert ds.skipped_rows == (
        "rows.csv line 8: 0.png repeats rows.csv line 2, left out",
        "rows.csv line 9: 0.png repeats rows.csv line 2, left out",
        "rows.csv line 10: 1.png repeats rows.csv line 3, left out",
    )
    assert ds.fingerprint == _formula(tmp_path, [(tmp_path / p, label) for p, label in rows])
    assert read_dataset(manifest).fingerprint == ds.fingerprint


def _hash(lines: list[str]) -> str:
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:32]


def test_an_imagefolder_in_columns_keeps_its_fingerprint_and_drops_a_linked_repeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "folder"
    for i in range(6):
        (root / f"c{i % 2}" / ("deep" if i > 3 else "")).mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 2}" / ("deep" if i > 3 else "") / f"{i}.png").write_bytes(bytes([i]) * (i + 1))
    os.symlink(root / "c0" / "0.png", root / "c0" / "deep" / "again.png")
    ds = read_dataset(root)
    rows = [("c0", "0.png"), ("c0", "2.png"), ("c0", "deep/4.png"), ("c1", "1.png"), ("c1", "3.png")]
    rows.append(("c1", "deep/5.png"))
    assert isinstance(ds.paths, Files) and ds.paths == [root / c / name for c, name in rows]
    assert ds.skipped_rows == (f"{root}/c0/deep/again.png: again.png repeats {root}/c0/0.png, left out",)
    assert ds.fingerprint == _formula(root, [(root / c / name, c) for c, name in rows])
    monkeypatch.chdir(root)  # a relative folder: its files' paths as `Path` writes them
    assert read_imagefolder(Path(".")).paths == [Path(c) / name for c, name in rows]


def test_webdataset_members_in_columns_keep_their_fingerprint_and_pickle_as_arrays(tmp_path: Path) -> None:
    """A member's name is `<shard under the root (the shards' folder)>/<member>`, its size the member's, its time
    the shard's."""
    from services.data.formats.members import Members
    from services.data.formats.samples import ShardMember

    samples = [(f"k{i}", {"png": bytes([i]) * (i + 3), "cls": str(i % 2).encode()}) for i in range(5)]
    (tmp_path / "sh").mkdir()
    for s in range(2):
        _tar(tmp_path / "sh" / f"{s:06d}.tar", samples[s * 3 : s * 3 + 3])
    ds = read_dataset(f"{tmp_path}/sh/{{000000..000001}}.tar")
    assert isinstance(ds.paths, Members) and len(ds) == 5 and ds.classes == ["0", "1"]
    assert all(isinstance(m, ShardMember) for m in ds.paths) and ds.paths[-1] == list(ds.paths)[-1]
    assert pickle.loads(pickle.dumps(ds.paths)) == ds.paths and len(pickle.dumps(ds.paths)) < 2000
    lines = []
    for i, m in enumerate(ds.paths):
        assert m.read_bytes() == samples[i][1]["png"]
        shard = m.shard.stat()
        lines.append(f"{m.shard.name}/k{i}.png\0{i % 2}\0{i + 3}\0{shard.st_mtime_ns}\n")
    assert ds.fingerprint == _hash(lines)


def test_hugging_face_rows_in_columns_keep_their_fingerprint_and_pickle_as_arrays(tmp_path: Path) -> None:
    """A row's name is `<file under the root>[<row>]`, its size and time its file's; a row naming only an image file
    is that file, by its own name, size and time."""
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from services.data.formats.samples import TableRow
    from services.data.formats.table_rows import TableRows

    (tmp_path / "hf" / "img").mkdir(parents=True)
    (tmp_path / "hf" / "img" / "a.png").write_bytes(b"file")
    images = [{"bytes": bytes([i]) * 4, "path": f"{i}.png"} for i in range(4)] + [{"bytes": None, "path": "img/a.png"}]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    table = pa.Table.from_pylist(
        [{"image": im, "label": f"n{i % 2}"} for i, im in enumerate(images)], schema=features.arrow_schema
    )
    file = tmp_path / "hf" / "train.parquet"
    pq.write_table(table, file, row_group_size=2)
    ds = read_dataset(tmp_path / "hf")
    assert isinstance(ds.paths, TableRows) and len(ds) == 5 and ds.classes == ["n0", "n1"]
    assert ds.paths[:4] == [TableRow(file, i, "image", f"{i}.png") for i in range(4)]
    assert ds.paths[4] == tmp_path / "hf" / "img" / "a.png" and ds.paths[0].read_bytes() == bytes(4)
    assert pickle.loads(pickle.dumps(ds.paths)) == ds.paths and len(pickle.dumps(ds.paths)) < 2000
    st, image = file.stat(), (tmp_path / "hf" / "img" / "a.png").stat()
    lines = [f"train.parquet[{i}]\0n{i % 2}\0{st.st_size}\0{st.st_mtime_ns}\n" for i in range(4)]
    lines.append(f"img/a.png\0n0\0{image.st_size}\0{image.st_mtime_ns}\n")
    assert ds.fingerprint == _hash(lines)


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
