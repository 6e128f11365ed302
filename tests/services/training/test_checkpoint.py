"""The training loop's checkpoint (services/training/checkpoint.py): the writer writes in the background, in order, all
of them written when the loop ends, a failed write reported in the loop without hiding the loop's own error; a
LoopState saved is the LoopState resumed. Resuming jobs from checkpoints is tested with the sweeps
(tests/services/training/test_sweeps.py), early termination (test_halving.py) and by killing workers (tests/worker/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services import methods
from services.jobs.progress import Cancelled
from services.methods.losa.config import LosaConfig
from services.training import checkpoint
from services.training.checkpoint import Writer
from services.training.objectives import Objective
from services.training.state import LoopState
from services.training.sweeps.stacked import make_runs
from storage.artifacts import as_folder
from storage.store import StoreUnavailable
from tests.services.training.test_sweeps import feature_info, hyperparameters


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


def _state(epochs: int) -> LoopState:
    """Three LoSA configurations stacked and one of another rank on its own, as a sweep's loop starts them."""
    torch.manual_seed(0)
    configs = [LosaConfig(rank=2), LosaConfig(rank=2), LosaConfig(rank=4), LosaConfig(rank=2)]
    models = [methods.build(c, feature_info()) for c in configs]
    hps = [hyperparameters(optimizer="sgd", lr=lr, weight_decay=0.0, clip_grad_norm=None) for lr in (1, 2, 3, 4)]
    objective = Objective(np.arange(5), 5)
    runs, where = make_runs(models, configs, hps, objective, "cpu")
    return LoopState.start(runs, where, ["epoch", "train_loss", "val_accuracy"], epochs)


def test_a_loop_state_saved_is_the_loop_state_resumed(tmp_path: Path) -> None:
    """After two epochs, one of them with a configuration stopped by early termination: the resumed state has the
    same configurations in the same places, weights, optimizer state, best weights, figures, curves and clocks."""
    state = _state(epochs=4)
    x, y = torch.randn(8, len(state.runs[0].input_layers), 9, 16).half(), torch.arange(8) % 5
    for epoch in range(2):
        for r in state.runs:
            r.step(x, y, 1.0)
        state.curves[:, epoch] = [[epoch + 1, 0.5 + j, 0.1 * j] for j in range(4)]
        state.results[epoch].score, state.results[epoch].epoch = 0.9, epoch + 1
        state.keep_best({0: [0]})
        if epoch == 0:
            state.stop({1}, 1)
        state.epoch, state.seconds, state.seen = epoch + 1, 2.5 * (epoch + 1), 8 * (epoch + 1)
    with Writer() as writer:
        checkpoint.save(writer, tmp_path / "ckpt", state)

    resumed = _state(epochs=4)
    assert checkpoint.resume(tmp_path / "ckpt", resumed)
    assert (resumed.epoch, resumed.seconds, resumed.seen) == (2, 5.0, 16)
    assert resumed.stopped == {1: 1} and resumed.where == state.where and resumed.flat == state.flat
    np.testing.assert_array_equal(resumed.curves, state.curves)
    assert [(r.score, r.loss, r.epoch) for r in resumed.results] == [(r.score, r.loss, r.epoch) for r in state.results]
    for ours, theirs in zip(resumed.runs, state.runs, strict=True):
        assert ours.count == theirs.count
        for name, value in theirs.states().items():
            np.testing.assert_array_equal(ours.states()[name], value, err_msg=name)
        (ours_t, ours_info), (theirs_t, theirs_info) = ours.checkpoint(), theirs.checkpoint()
        assert ours_t.keys() == theirs_t.keys() and ours_info == theirs_info
        for name in theirs_t:
            np.testing.assert_array_equal(ours_t[name], theirs_t[name], err_msg=name)
    for ours, theirs in zip(resumed.best, state.best, strict=True):
        assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    assert not checkpoint.resume(tmp_path / "none", _state(epochs=4))  # nothing saved: the loop starts afresh
