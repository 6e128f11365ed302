"""Hugging Face datasets (services/data/formats/huggingface.py), written by the `datasets` library from the digits
ImageFolder: a `save_to_disk` folder and Parquet shards read as the folder they came from (images read in place from
the Arrow/Parquet bytes), a ClassLabel's names as the classes in their order, a string label column, multi-label
lists, the dataset's own train/validation/test splits kept by the planner, Parquet rows naming image files checked by
the paths rule, and clear errors: a missing column, a Hub id the server cannot reach, the library not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets")

import datasets  # noqa: E402

from services.data.datasets import (  # noqa: E402
    DatasetError,
    TableRow,
    load_image,
    read_dataset,
    read_for_job,
    read_imagefolder,
)
from services.data.formats.base import HuggingFaceOptions  # noqa: E402
from services.data.splits import split  # noqa: E402
from services.jobs.resolved import resolve  # noqa: E402
from services.paths import ForbiddenPath, UserPaths  # noqa: E402
from services.spec import DatasetSpec, JobSpec  # noqa: E402
from storage.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[4]


def digits_dataset(root: Path, names: list[str] | None = None, label: str = "classlabel") -> datasets.Dataset:
    """The digits ImageFolder's images (their PNG bytes, embedded) and labels as a `datasets.Dataset`."""
    folder = read_imagefolder(root)
    rows = {
        "image": [{"bytes": p.read_bytes(), "path": p.name} for p in folder.paths],
        "label": folder.labels.tolist() if label == "classlabel" else [folder.classes[i] for i in folder.labels],
    }
    kind = datasets.ClassLabel(names=names or folder.classes) if label == "classlabel" else datasets.Value("string")
    return datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(), "label": kind}))


def test_a_save_to_disk_folder_reads_as_the_imagefolder_it_came_from(digits_root: Path, tmp_path: Path) -> None:
    digits_dataset(digits_root / "train").save_to_disk(tmp_path / "saved")
    folder = read_imagefolder(digits_root / "train")
    hf = read_dataset(tmp_path / "saved")  # auto: a save_to_disk folder
    assert hf.classes == folder.classes and hf.parts is None and hf.kind == "image"
    np.testing.assert_array_equal(hf.labels, folder.labels)
    assert all(isinstance(item, TableRow) for item in hf.paths) and hf.paths[0].suffix == ".png"
    for i in (0, len(hf) - 1):
        assert hf.paths[i].read_bytes() == folder.paths[i].read_bytes()
        np.testing.assert_array_equal(np.asarray(load_image(hf.paths[i])), np.asarray(load_image(folder.paths[i])))
    assert not any(p.suffix == ".png" for p in (tmp_path / "saved").rglob("*"))  # nothing written out


def test_parquet_shards_read_in_order_and_a_classlabel_keeps_its_order(digits_root: Path, tmp_path: Path) -> None:
    folder = read_imagefolder(digits_root / "train")
    names = [f"digit-{9 - i}" for i in range(10)]  # not sorted: the ClassLabel's order is kept
    ds = digits_dataset(digits_root / "train", names=names)
    for i in range(3):
        ds.shard(3, i, contiguous=True).to_parquet(tmp_path / "pq" / "data" / f"train-{i:05d}-of-00003.parquet")
    hf = read_dataset(tmp_path / "pq")  # auto: Parquet files under data/
    assert hf.classes == names and len(hf) == len(folder)
    np.testing.assert_array_equal(hf.labels, folder.labels)  # label i is ClassLabel name i
    assert hf.paths[-1].read_bytes() == folder.paths[-1].read_bytes()


def test_a_string_label_column_names_the_classes(digits_root: Path, tmp_path: Path) -> None:
    digits_dataset(digits_root / "train", label="string").to_parquet(tmp_path / "digits.parquet")
    folder = read_imagefolder(digits_root / "train")
    hf = read_dataset(tmp_path / "digits.parquet")
    assert hf.classes == folder.classes  # sorted by name, as for every format without a ClassLabel
    np.testing.assert_array_equal(hf.labels, folder.labels)


def test_a_missing_column_is_named_with_the_columns_there(digits_root: Path, tmp_path: Path) -> None:
    digits_dataset(digits_root / "train").save_to_disk(tmp_path / "saved")
    with pytest.raises(DatasetError, match=r"no column 'labels' \(dataset.huggingface.label_column\).*image, label"):
        read_dataset(tmp_path / "saved", huggingface=HuggingFaceOptions(label_column="labels"))
    with pytest.raises(DatasetError, match=r"no column 'img' \(dataset.huggingface.image_column\)"):
        read_dataset(tmp_path / "saved", huggingface=HuggingFaceOptions(image_column="img"))
    with pytest.raises(DatasetError, match="column 'label' holds int64, not images"):
        read_dataset(tmp_path / "saved", huggingface=HuggingFaceOptions(image_column="label"))


def test_a_sequence_of_classlabel_is_multi_label(digits_root: Path, tmp_path: Path) -> None:
    folder = read_imagefolder(digits_root / "train")
    tags = [[int(y), (int(y) + 1) % 10] for y in folder.labels]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.Sequence(datasets.ClassLabel(names=folder.classes))}
    )
    rows = {"image": [{"bytes": p.read_bytes(), "path": p.name} for p in folder.paths], "label": tags}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "multi")
    hf = read_dataset(tmp_path / "multi", multi_label=True)
    assert hf.multi_label and hf.classes == folder.classes
    assert hf.labels.sum() == 2 * len(hf) and all(hf.labels[i, t].all() for i, t in enumerate(tags))
    with pytest.raises(DatasetError, match="lists of labels; set dataset.multi_label"):
        read_dataset(tmp_path / "multi")


def _settings(root: Path) -> Settings:
    return Settings(data_dir=root / "data", allowed_roots=[root])


def _spec(path: Path, **dataset: object) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"path": str(path), **dataset},
            "backbone": {"name": "test_vit", "pretrained": False, "image_size": 64},
            "method": {"name": "linear"},
        }
    )


def test_the_datasets_own_splits_are_the_jobs(digits_root: Path, tmp_path: Path) -> None:
    ds = digits_dataset(digits_root / "train").shuffle(seed=0)
    n = len(ds)
    splits = {"train": range(0, n - 60), "validation": range(n - 60, n - 30), "test": range(n - 30, n)}
    datasets.DatasetDict({k: ds.select(v) for k, v in splits.items()}).save_to_disk(tmp_path / "dd")
    hf = read_dataset(tmp_path / "dd")
    np.testing.assert_array_equal(np.bincount(hf.parts), [n - 60, 30, 30])
    resolved, _ = resolve(_spec(tmp_path / "dd"), _settings(tmp_path))
    assert (resolved.split.train, resolved.split.val, resolved.split.test) == (n - 60, 30, 30)
    assert resolved.test_images == 30
    drawn, pooled = resolve(_spec(tmp_path / "dd", huggingface={"splits": "draw"}), _settings(tmp_path))
    assert pooled.parts is None and drawn.split.test == 0  # pooled, drawn by val_fraction as for any format
    assert drawn.split.val == len(split(pooled.labels, 0.2, 0.0, 0)[1])
    with pytest.raises(DatasetError, match="has its own test split; leave dataset.test_fraction out"):
        resolve(_spec(tmp_path / "dd", test_fraction=0.1), _settings(tmp_path))

    # train and test only (as many Hub datasets): validation drawn from train, the test split kept
    datasets.DatasetDict({"train": ds.select(range(n - 30)), "test": ds.select(range(n - 30, n))}).save_to_disk(
        tmp_path / "tt"
    )
    resolved, dataset = resolve(_spec(tmp_path / "tt", val_fraction=0.25), _settings(tmp_path))
    assert resolved.split.test == 30 and resolved.split.val == pytest.approx((n - 30) * 0.25, abs=10)
    codes = resolved.split.load(None)
    np.testing.assert_array_equal(codes[dataset.parts == 2], 2)  # the test rows are the dataset's test split
    assert not (codes[dataset.parts == 0] == 2).any()


def test_parquet_rows_naming_files_read_them_under_the_paths_rule(digits_root: Path, tmp_path: Path) -> None:
    folder = read_imagefolder(digits_root / "train")
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=folder.classes)})
    rows = {"image": [str(p) for p in folder.paths], "label": folder.labels.tolist()}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(allowed / "paths.parquet")  # paths, no bytes
    hf = read_dataset(allowed / "paths.parquet")
    assert hf.paths == folder.paths  # read from the files the rows name
    rule = UserPaths(Settings(data_dir=tmp_path / "data", allowed_roots=[allowed, digits_root.parent]))
    assert len(read_for_job(DatasetSpec(path=str(allowed / "paths.parquet")), rule)) == len(folder)
    rule = UserPaths(Settings(data_dir=tmp_path / "data", allowed_roots=[allowed, outside]))
    with pytest.raises(ForbiddenPath, match="outside the allowed roots"):
        read_for_job(DatasetSpec(path=str(allowed / "paths.parquet")), rule)


def _start(code: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return _finish(_start(code, **env))


HUB_READ = (
    "from services.data.datasets import DatasetError, read_dataset\n"
    "try:\n    read_dataset('hf://sidetune-tests/digits')\nexcept DatasetError as e:\n    print('ERROR', e)\n"
)


def test_a_hub_id_the_server_cannot_reach_is_a_clear_error(tmp_path: Path) -> None:
    # side by side: the unreachable endpoint is retried with backoff (huggingface_hub's, about 23 s of waiting)
    started = _start(HUB_READ, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf2"), HF_HUB_OFFLINE="0")
    offline = _run(HUB_READ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    unreachable = _finish(started)
    assert "ERROR hf://sidetune-tests/digits: the Hugging Face Hub dataset" in offline.stdout, offline.stderr
    assert "offline (HF_HUB_OFFLINE is set)" in offline.stdout and "save_to_disk" in offline.stdout
    assert "ERROR hf://sidetune-tests/digits: the Hugging Face Hub dataset" in unreachable.stdout, unreachable.stderr
    # a Hub id names no server path: nothing for the rule to check at submission
    assert DatasetSpec(path="hf://sidetune-tests/digits").locations() == []


def test_without_the_library_the_error_names_the_extra(digits_root: Path, tmp_path: Path) -> None:
    digits_dataset(digits_root / "train").save_to_disk(tmp_path / "saved")
    code = "import sys\nsys.modules['datasets'] = None\n" + HUB_READ.replace(
        "hf://sidetune-tests/digits", str(tmp_path)
    )
    out = _run(code.replace(f"'{tmp_path}'", f"'{tmp_path / 'saved'}'"))
    assert "not installed here; install the `hf` extra on the server: pip install 'sidetune[hf]'" in out.stdout, out


def test_the_api_imports_neither_datasets_nor_pyarrow() -> None:
    code = "import sys, api.main\nheavy = [m for m in ('datasets', 'pyarrow') if m in sys.modules]\n"
    code += "assert not heavy, heavy"
    out = _run(code)
    assert out.returncode == 0, out.stderr
