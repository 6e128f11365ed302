"""Loader processes (services/data/loading.py): the same batches as the in-process loader, corrupt images reported by
name, and no loader process left behind when a run is cancelled or its process is SIGKILLed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from services.backbones import load_backbone
from services.data.datasets import DatasetError, read_imagefolder
from services.data.loading import BatchReader, iterate
from services.spec import BackboneSpec

ROOT = Path(__file__).resolve().parents[3]  # the repository


@pytest.fixture(scope="module")
def split():
    return load_backbone(BackboneSpec(name="test_vit", pretrained=False, image_size=64)).split


@pytest.fixture
def corrupt(digits_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "corrupt"
    shutil.copytree(digits_root / "train", root)
    bad = root / "4" / "0000_bad.png"
    bad.write_bytes(b"not an image at all")
    return root, bad


def batches_of(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(s, min(n, s + size)) for s in range(0, n, size)]


def loader_pids() -> set[int]:
    """This process's DataLoader workers: the forkserver's children (the server and the resource tracker are ours)."""
    me = psutil.Process()
    return {p.pid for p in me.children(recursive=True)} - {p.pid for p in me.children()}


def wait_until(predicate, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_loader_processes_give_the_same_batches_in_order(digits_root: Path, split) -> None:
    dataset = read_imagefolder(digits_root / "train")
    order = np.random.default_rng(0).permutation(len(dataset))
    batches = [order[b] for b in batches_of(len(dataset), 24)]
    inline = list(iterate(BatchReader(dataset.paths, batches, split.pil, False), workers=0))
    parallel = list(iterate(BatchReader(dataset.paths, batches, split.pil, False), workers=2))
    threads = list(iterate(BatchReader(dataset.paths, batches, split.pil, False), workers=0, threads=3))
    assert len(parallel) == len(threads) == len(batches)
    for a, b, rows in [*zip(inline, parallel, batches, strict=True), *zip(inline, threads, batches, strict=True)]:
        assert b.images.dtype.is_floating_point is False and b.images.shape == (len(rows), 64, 64, 3)
        np.testing.assert_array_equal(a.images.numpy(), b.images.numpy())
        np.testing.assert_array_equal(b.positions, rows)
        assert b.valid.all() and not b.errors


@pytest.mark.parametrize(("workers", "threads"), [(0, 1), (0, 2), (2, 1)])
def test_corrupt_images_are_skipped_and_named_or_fail_naming_the_file(corrupt, split, workers, threads) -> None:
    root, bad = corrupt
    dataset = read_imagefolder(root)
    where = dataset.paths.index(bad)
    batches = batches_of(len(dataset), 16)
    loaded = list(iterate(BatchReader(dataset.paths, batches, split.pil, True), workers, threads=threads))
    valid = np.concatenate([b.valid for b in loaded])
    assert np.flatnonzero(~valid).tolist() == [where]
    errors = [e for b in loaded for e in b.errors]
    assert len(errors) == 1 and errors[0].startswith(f"{bad}: not a readable image")
    with pytest.raises(DatasetError) as err:
        list(iterate(BatchReader(dataset.paths, batches, split.pil, False), workers, threads=threads))
    assert str(bad) in str(err.value) and "Traceback" not in str(err.value)


def test_a_model_on_the_cpu_keeps_the_cores_its_loaders_leave(monkeypatch) -> None:
    import torch

    from services.data.loading import cpu_threads_beside, loader_workers
    from storage.settings import Settings

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    settings = Settings(loader_workers="auto")
    assert loader_workers(settings, 10_000, "cuda") == 14  # the GPU runs the model: every other core decodes
    assert loader_workers(settings, 10_000, "cpu") == 4  # the CPU runs it too, and it is the slow side
    assert loader_workers(settings, 100, "cpu") == 0
    before = torch.get_num_threads()
    with cpu_threads_beside(1, torch.device("cpu")):
        assert torch.get_num_threads() == max(1, before - 1)
    with cpu_threads_beside(0, torch.device("cpu")):  # decoded between forwards (iterate's threads): all cores
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_a_run_stopped_early_shuts_its_loader_processes_down(digits_root: Path, split) -> None:
    dataset = read_imagefolder(digits_root / "train")
    before = loader_pids()
    run = iterate(BatchReader(dataset.paths, batches_of(len(dataset), 8), split.pil, False), workers=2)
    next(run)  # workers started, batches in flight
    assert len(loader_pids() - before) == 2
    run.close()  # what a cancelled or failed extraction does (contextlib.closing)
    assert wait_until(lambda: not (loader_pids() - before)), loader_pids() - before


def test_loader_processes_die_with_a_sigkilled_parent(digits_root: Path, tmp_path: Path) -> None:
    """The parent (an extract worker) SIGKILLed mid-run: its forkserver and every loader process go too."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from pathlib import Path
        from services.backbones import load_backbone
        from services.data.datasets import read_imagefolder
        from services.data.loading import BatchReader, iterate
        from services.spec import BackboneSpec

        if __name__ == "__main__":
            split = load_backbone(BackboneSpec(name="test_vit", pretrained=False, image_size=64)).split
            dataset = read_imagefolder(Path({str(digits_root / "train")!r}))
            batches = [np.arange(len(dataset))[i:i + 2] for i in range(0, len(dataset), 2)] * 50
            for k, _ in enumerate(iterate(BatchReader(dataset.paths, batches, split.pil, False), 3)):
                if k == 0:
                    print("loading", flush=True)
                time.sleep(0.05)  # a slow consumer: the loaders stay busy filling their queues
    """)
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert parent.stdout.readline().strip() == "loading"
        family = psutil.Process(parent.pid).children(recursive=True)
        assert len(family) >= 5  # forkserver, resource tracker, 3 loaders
        parent.send_signal(signal.SIGKILL)
        parent.wait()

        def gone() -> bool:
            return all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in family)

        # what is asserted is that they go, not how fast: at load 10 on two cores one outlived 15 s once
        assert wait_until(gone, timeout_s=60), [(p.pid, p.status()) for p in family if p.is_running()]
    finally:
        parent.kill()
