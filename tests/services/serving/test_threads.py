"""services/serving/threads.py: a pool whose threads exit when idle, so the OpenMP team that a thread's torch work
started goes with it (the batcher's team alone again), while the work beyond its threads queues."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from services.serving.threads import ExitingPool


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _settle(expected: int, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while _threads() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return _threads()


def test_at_most_max_workers_run_and_the_rest_queue() -> None:
    pool = ExitingPool(2, "test")
    gate, running, peak = threading.Event(), [], []

    def work(i: int) -> int:
        running.append(i)
        peak.append(len(running))
        assert gate.wait(30)
        running.remove(i)
        return i * 10

    futures = [pool.submit(work, i) for i in range(5)]
    time.sleep(0.2)
    assert len(running) == 2
    gate.set()
    assert [f.result(30) for f in futures] == [0, 10, 20, 30, 40] and max(peak) == 2
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(30)
    pool.shutdown(cancel_futures=True)
    with pytest.raises(RuntimeError):
        pool.submit(work, 0)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or torch.get_num_threads() < 2, reason="Linux, 2+ threads")
def test_a_threads_openmp_team_goes_with_it() -> None:
    x = torch.randn(512, 512)
    x @ x  # this thread's team, started before counting
    before = _threads()
    pool = ExitingPool(1, "test")
    pool.submit(lambda: (x @ x).sum().item()).result(30)  # a parallel op in the pool's thread: a team of its own
    assert _settle(before) == before  # the thread and its team's workers are gone
