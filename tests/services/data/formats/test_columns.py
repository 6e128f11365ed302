"""A manifest's rows as compact columns (services/data/formats/columns.py): a `Files` column reads as the list of
paths it stands for (indexing, slices, iteration, equality, pickling to the loader processes), the `Resolver` resolves
as `Path.resolve()` does (links, `..`, missing files), and a manifest read into columns keeps the fingerprint written
by the documented formula (so the feature cache's keys of existing datasets are unchanged), its repeats and links
dropped as before."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from services.data.datasets import read_csv, read_dataset
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
