"""Rows a dataset leaves out stay a few notes however many there are (services/data/formats/left_out.py): a manifest
repeating two images 30,000 times, with missing files under on_corrupt=skip, keeps the first 20 notes and a count of
each kind; the plan's note and the extraction's event say the counts, show the first and end "... and K more"; the
cache entry records the counts, from which training reads how many rows were left out. What is kept is unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from services.data.datasets import read_dataset
from services.data.formats.left_out import KEEP, LeftOut, Notes, left_out_count
from services.extraction import run_extraction
from services.jobs.planner import plan
from services.jobs.progress import NullReporter
from services.spec import JobSpec
from storage.cache import FeatureCache
from storage.settings import Settings

REPEATS = 30_000


def write_manifest(digits_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Two digits of two classes each (copied next to it), then the first repeated `REPEATS` times, then 3 rows of
    files that are not there: the manifest, and the repeated file."""
    (tmp_path / "img").mkdir()
    for k in ("0", "1"):
        for p in sorted((digits_root / "train" / k).glob("*.png"))[:2]:
            shutil.copy(p, tmp_path / "img" / f"{k}-{p.name}")
    a, b, c, d = (f"img/{p.name}" for p in sorted((tmp_path / "img").iterdir()))
    rows = [f"{a},0", f"{b},0", f"{c},1", f"{d},1"] + [f"{a},0"] * REPEATS
    rows += [f"img/gone-{i}.png,1" for i in range(3)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    return manifest, tmp_path / a


def test_notes_keep_the_first_and_count_every_kind() -> None:
    notes = Notes(LeftOut(("m.csv line 9: x.png does not exist, left out",), (("missing file", 1),)))
    for i in range(100):
        notes.add("repeated", f"line {i}")
    left = notes.build()
    assert len(left.notes) == KEEP and left.notes[1] == "line 0" and left.total == 101
    assert left.kinds() == "missing file: 1, repeated: 100"
    assert left.text(2) == (
        "101 dataset rows are left out (missing file: 1, repeated: 100): m.csv line 9: x.png does not exist, left "
        "out; line 0 ... and 99 more"
    )
    assert left.listed()[-1] == "... and 81 more" and len(left.listed()) == KEEP + 1
    assert LeftOut(("a",), (("repeated", 1),)).text() == "1 dataset rows are left out (repeated: 1): a"
    assert not LeftOut() and left_out_count({"skipped_rows": ["a", "b"]}) == 2  # an entry from before the counts


def test_many_left_out_rows_keep_few_notes_in_the_plan_and_events(digits_root: Path, tmp_path: Path) -> None:
    manifest, repeated = write_manifest(digits_root, tmp_path)
    ds = read_dataset(manifest, on_corrupt="skip")
    assert len(ds) == 4 and np.bincount(ds.labels).tolist() == [2, 2]  # what is kept: as before
    left = ds.left_out
    assert left.total == REPEATS + 3 and left.counts == (("missing file", 3), ("repeated", REPEATS))
    assert len(ds.skipped_rows) == KEEP and ds.skipped_rows[0].startswith(f"m.csv line {REPEATS + 6}: ")
    assert ds.skipped_rows[3] == f"m.csv line 6: {repeated.name} repeats m.csv line 2, left out"

    settings = Settings(data_dir=tmp_path / "data", allowed_roots=[tmp_path], device="cpu")
    spec = JobSpec.model_validate(
        {
            "dataset": {"path": str(manifest), "on_corrupt": "skip", "val_fraction": 0.5},
            "backbone": {"name": "test_vit", "pretrained": False, "image_size": 32},
            "method": {"name": "linear"},
        }
    )
    note = next(n for n in plan(spec, settings).notes if "left out" in n)
    assert note.startswith(f"{REPEATS + 3:,} dataset rows are left out (missing file: 3, repeated: {REPEATS:,}): ")
    assert note.endswith(f" ... and {REPEATS + 2:,} more")
    reporter = NullReporter()
    key = run_extraction(spec, settings, reporter)["cache_key"]
    event = next(e for e in reporter.events if "dataset rows are left out" in e["message"])
    assert event["message"] == note and event["level"] == "warning"
    listed = event["data"]["left_out"]
    assert len(listed) == KEEP + 1 and listed[-1] == f"... and {REPEATS - 17:,} more"
    assert event["data"]["left_out_counts"] == {"missing file": 3, "repeated": REPEATS}
    meta = FeatureCache(settings.cache_location).entry(key).meta
    assert len(meta["skipped_rows"]) == KEEP and left_out_count(meta) == REPEATS + 3
