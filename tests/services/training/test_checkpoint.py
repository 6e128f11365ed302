"""The training loop's checkpoint writer (services/training/checkpoint.py): writes in the background, in order, all of
them written when the loop ends, a failed write reported in the loop without hiding the loop's own error. Resuming
from checkpoints is tested with the sweeps (tests/services/training/test_sweeps.py) and by killing workers
(tests/worker/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.jobs.progress import Cancelled
from services.training.checkpoint import Writer
from storage.artifacts import as_folder
from storage.store import StoreUnavailable


def test_writes_land_in_order_and_all_are_written_when_the_block_ends(tmp_path: Path) -> None:
    folder = as_folder(tmp_path / "ckpt")
    with Writer() as writer:
        for epoch in range(1, 6):
            writer.put(folder, [("a.bin", bytes([epoch]) * 1000), ("b.json", str(epoch).encode())])
    assert (tmp_path / "ckpt" / "a.bin").read_bytes() == bytes([5]) * 1000
    assert (tmp_path / "ckpt" / "b.json").read_text() == "5"


def test_a_failed_write_raises_in_the_loop(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where the checkpoint folder should be")
    folder = as_folder(tmp_path / "blocked" / "ckpt")
    with pytest.raises(StoreUnavailable, match="blocked"), Writer() as writer:
        writer.put(folder, [("a.bin", b"x")])
        writer.put(folder, [("a.bin", b"y")])  # waits for the first write, whose error surfaces here


def test_the_loops_own_error_is_not_hidden_by_a_failed_write(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("")
    with pytest.raises(Cancelled), Writer() as writer:
        writer.put(as_folder(tmp_path / "blocked" / "ckpt"), [("a.bin", b"x")])
        raise Cancelled("job")  # what the caller must see
