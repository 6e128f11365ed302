"""Sweeps: the grid and its validation, configurations stacked into one set of tensors (equal to training each on its
own), and a sweep job that reads the cache once per epoch for every configuration, selects on validation, resumes."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from services import methods
from services.extraction import run_extraction
from services.jobs.progress import Cancelled, NullReporter
from services.methods.linear.config import LinearConfig
from services.methods.losa.config import LosaConfig
from services.methods.readout import FeatureInfo
from services.spec import Hyperparameters, JobSpec
from services.spec.sweep import check_size
from services.training.job import train_job
from services.training.objectives import Objective
from services.training.runs import ModuleRuns
from services.training.sweeps.optim import StackedOptimizer
from services.training.sweeps.stacked import StackedRuns, make_runs
from storage.artifacts import read_tensors
from storage.cache import CacheEntry
from storage.settings import Settings

BACKBONE = {"name": "test_vit", "pretrained": False}
HPS = [(0.1, 0.0), (0.03, 0.1), (0.01, 0.5)]  # (lr, weight decay) of three configurations


def spec(path: Path | str = "x", method: dict | None = None, sweep: dict | None = None, **training) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"path": str(path)},
            "backbone": BACKBONE,
            "method": method or {"name": "losa", "rank": 4},
            "extraction": {"batch_size": 32},
            "training": {"epochs": 2, "batch_size": 32, **training},
            **({"sweep": sweep} if sweep is not None else {}),
        }
    )


def hyperparameters(**given) -> Hyperparameters:
    """What a Runs reads of a configuration's settings (the loop's own, epochs and warmup, do not matter here)."""
    return Hyperparameters(epochs=1, warmup_epochs=0.0, **given)


def feature_info(tokens: int = 9, pool_prefix: int = 0) -> FeatureInfo:
    # no prefix token and mean pooling: every token reaches the loss, so no parameter has an exactly zero gradient
    # (Adam turns a gradient of 1e-12 from another summation order into a full step)
    return FeatureInfo(
        num_layers=4,
        tokens=tokens,
        dim=16,
        num_prefix_tokens=pool_prefix,
        global_pool="avg",
        norm_eps=1e-6,
        num_classes=5,
        readout={"norm.weight": np.full(16, 1.1, np.float32), "norm.bias": np.zeros(16, np.float32)},
    )


# ------------------------------------------------------------------------------------------------ the grid


@pytest.mark.parametrize(
    ("method", "sweep", "message"),
    [
        ({"name": "losa"}, {"depth": [1]}, "sweep.depth"),
        ({"name": "losa"}, {}, "the sweep is empty"),
        ({"name": "losa"}, {"rank": []}, "sweep.rank"),
        ({"name": "losa"}, {"lr": [0.1, 0.1]}, "sweep.lr lists 0.1 more than once"),
        ({"name": "linear"}, {"rank": [4]}, "sweep.rank: method 'linear' has no field 'rank'"),
        ({"name": "apla"}, {"rank": [4, 8]}, "sweep.rank: method 'apla' trains through the backbone"),
        ({"name": "linear"}, {"lr": [0.1]}, "sweep.lr: the linear probe's L-BFGS solver has no learning rate"),
        ({"name": "losa"}, {"lr": [-1.0]}, "sweep.lr.0"),
        ({"name": "losa"}, {"lr": [float("nan")]}, "sweep.lr.0\n  Input should be a finite number"),
        ({"name": "losa"}, {"rank": [True]}, "sweep.rank.0\n  Input should be a valid integer"),
        ({"name": "apla"}, {"lr": [0.1, 100.0]}, "sweep.lr.1\n  Input should be less than or equal to 10"),
        (
            {"name": "arc"},
            {"weight_decay": [100.0]},
            "sweep.weight_decay.0\n  Input should be less than or equal to 10",
        ),
    ],
)
def test_bad_sweeps_are_refused_naming_the_key(method: dict, sweep: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(method=method, sweep=sweep)


def test_a_long_grid_is_refused_in_linear_time() -> None:
    values = [i * 1e-6 for i in range(1, 50_001)]
    t0 = time.perf_counter()
    with pytest.raises(ValidationError, match="sweep.lr lists 1e-06 more than once"):
        spec(sweep={"lr": [*values, 1e-6]})
    assert time.perf_counter() - t0 < 5  # the pairwise check took minutes at this length


def test_configurations_are_the_grid_and_each_is_validated() -> None:
    job = spec(sweep={"lr": [0.01, 0.1], "rank": [2, 4, 8]})
    assert job.sweep.size() == 6 and job.sweep.describe() == "2 lr x 3 rank = 6 configurations"
    assert [(c.training.lr, c.method.rank) for c in job.configurations()] == [
        (0.01, 2),
        (0.01, 4),
        (0.01, 8),
        (0.1, 2),
        (0.1, 4),
        (0.1, 8),
    ]
    assert spec(method={"name": "linear", "solver": "sgd"}, sweep={"lr": [0.1]}).linear_solver == "sgd"
    with pytest.raises(ValueError, match="at most 4 are allowed"):
        check_size(job.sweep, 4)
    # what a sweep caches: every layer any configuration reads, in a token mode all of them accept
    pools = spec(method={"name": "linear"}, sweep={"pool": ["cls", "mean"]})
    assert pools.cached_layers_and_tokens(6, "token") == ([5], "all")
    assert spec(method={"name": "linear"}).cached_layers_and_tokens(6, "token") == ([5], "cls")
    layers = spec(sweep={"layers": [[0], [2]]})
    assert layers.cached_layers_and_tokens(6, "token")[0] == [0, 2, 5]
    # choices that select the same blocks of a 6-block backbone, and a count beyond it, are refused when planned
    for same, message in (
        (["all", 6], r"'all' and 6 select the same blocks \[0, 1, 2, 3, 4, 5\]"),
        ([[1, 2], [2, 1]], r"\[1, 2\] and \[2, 1\] select the same blocks \[1, 2\]"),
    ):
        with pytest.raises(ValueError, match=f"sweep.layers: {message}"):
            spec(sweep={"layers": same, "lr": [0.1, 0.2]}).cached_layers_and_tokens(6, "token")
    with pytest.raises(ValueError, match="sweep.layers: 6 and 999 select the same blocks"):  # a count reads at most all
        spec(sweep={"layers": [2, 6, 999]}).cached_layers_and_tokens(6, "token")


# ------------------------------------------------------------------------------------- stacked = separate


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_stacked_optimizer_is_torch_optim_per_configuration(kind: str) -> None:
    torch.manual_seed(0)
    start = torch.randn(3, 4, 5)
    separate = [start[k].clone().requires_grad_() for k in range(3)]
    decay = {"params": None, "weight_decay": 0.0}
    opts = [
        (torch.optim.SGD if kind == "sgd" else torch.optim.AdamW)(
            [{**decay, "params": [p], "weight_decay": wd}], lr=lr, **({"momentum": 0.9} if kind == "sgd" else {})
        )
        for p, (lr, wd) in zip(separate, HPS, strict=True)
    ]
    stacked = {"w": start.clone().requires_grad_()}
    ours = StackedOptimizer(stacked, {"w"}, kind, [lr for lr, _ in HPS], [wd for _, wd in HPS])
    for step in range(6):
        scale = 0.3 + step / 10
        grad = torch.randn(3, 4, 5)
        for k, opt in enumerate(opts):
            separate[k].grad = grad[k].clone()
            opt.param_groups[0]["lr"] = HPS[k][0] * scale
            opt.step()
        stacked["w"].grad = grad.clone()
        ours.step(scale)
    for k in range(3):
        torch.testing.assert_close(stacked["w"][k], separate[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "temporal"),
    [
        (LosaConfig(rank=4, layers=3, pool="mean"), None),
        (LinearConfig(solver="sgd"), None),
        (LosaConfig(rank=4, layers=3, pool="mean"), 3),
    ],
    ids=["losa", "linear", "video-losa"],
)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_stacked_configurations_train_as_each_would_alone(method, temporal: int | None, kind: str) -> None:
    """Forward (forward_stacked, or torch.vmap for the video network), per-configuration clipping, no decay on
    biases/1-D, the optimizer, LoSA's micro-batches: K stacked configurations end where K separate modules with torch's
    optimizers end."""
    torch.manual_seed(0)
    info = dataclasses.replace(feature_info(), temporal=temporal)  # video: 9 tokens as 3 frames x 3 positions
    models = [methods.build(method, info) for _ in range(3)]
    for m in models:  # away from LoSA's zero up-projections, so that every parameter gets a gradient
        for name, p in m.named_parameters():
            if "up" in name:
                torch.nn.init.normal_(p, std=0.2)
    hps = [hyperparameters(optimizer=kind, lr=lr, weight_decay=wd, clip_grad_norm=0.5) for lr, wd in HPS]
    y = np.random.default_rng(0).integers(0, 5, 8)
    objective = Objective(y, 5, label_smoothing=0.1, class_weights="balanced")
    alone = [ModuleRuns(copy.deepcopy(m), h, objective, "cpu") for m, h in zip(models, hps, strict=True)]
    stacked = StackedRuns(models, hps, objective, "cpu")
    layers = len(models[0].input_layers)
    for step in range(5):
        x = torch.randn(8, layers, info.tokens, info.dim).half()
        t = objective.targets(y)
        losses = stacked.step(x, t, 0.5 + step / 10)
        torch.testing.assert_close(losses, torch.cat([r.step(x, t, 0.5 + step / 10) for r in alone]))
    ours = stacked.states()
    for k, r in enumerate(alone):
        theirs = r.states()
        assert ours.keys() == theirs.keys()
        for name in theirs:
            np.testing.assert_allclose(ours[name][k], theirs[name][0], atol=2e-6, rtol=1e-5, err_msg=name)


def test_make_runs_stacks_one_architecture_and_keeps_the_order() -> None:
    info = feature_info()
    methods_ = [LosaConfig(rank=2), LosaConfig(rank=4), LosaConfig(rank=2), LosaConfig(rank=4)]
    models = [methods.build(m, info) for m in methods_]
    hps = [hyperparameters(optimizer="sgd", lr=lr, weight_decay=0.0, clip_grad_norm=None) for lr in (1, 2, 3, 4)]
    runs, where = make_runs(models, methods_, hps, Objective(np.zeros(2, int), 5), "cpu")
    assert [type(r).__name__ for r in runs] == ["StackedRuns", "StackedRuns"]
    assert where == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [runs[i].base_lrs[k] for i, k in where] == [1, 2, 3, 4]


# --------------------------------------------------------------------------------------------- sweep jobs


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "train_seconds"} for row in history]


class CountReads:
    """Counts CacheEntry.read calls (the real reads run)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = CacheEntry.read

        def read(entry: CacheEntry, *a, **kw):
            self.calls += 1
            return real(entry, *a, **kw)

        monkeypatch.setattr(CacheEntry, "read", read)


@pytest.fixture(scope="module")
def losa_cache(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, str]:
    data = tmp_path_factory.mktemp("sweep_cache")
    settings = Settings(data_dir=data, allowed_roots=[digits_root], device="cpu", train_memory_mb=0)  # streamed
    key = run_extraction(spec(digits_root / "train"), settings, NullReporter())["cache_key"]
    return settings, key


def test_a_sweep_reads_each_batch_once_for_every_configuration(
    losa_cache: tuple[Settings, str], digits_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, key = losa_cache
    reads = CountReads(monkeypatch)
    one = train_job(spec(digits_root / "train", lr=0.05), settings, key, NullReporter(), tmp_path / "one")
    reads_one, reads.calls = reads.calls, 0
    grid = {"lr": [0.01, 0.05], "rank": [2, 4]}
    reporter = NullReporter()
    out = train_job(spec(digits_root / "train", sweep=grid), settings, key, reporter, tmp_path / "sweep")
    m = out["metrics"]
    n_train, n_val = m["train_images"], m["val_images"]
    per_epoch = -(-n_train // 32) + -(-n_val // 64)  # streamed: one read per training and validation batch
    # training and validation reads, plus the selected model's evaluation (validation again: no test split)
    assert reads_one == reads.calls == 2 * per_epoch + -(-n_val // 256)
    assert m["configurations"] == 4 and len(m["sweep"]) == 4
    assert [e["config"] for e in m["sweep"]] == [
        {"lr": 0.01, "rank": 2},
        {"lr": 0.01, "rank": 4},
        {"lr": 0.05, "rank": 2},
        {"lr": 0.05, "rank": 4},
    ]
    assert all(len(e["history"]) == 2 and e["history"][-1]["lr"] >= 0 for e in m["sweep"])
    best = max(m["sweep"], key=lambda e: (e["val_accuracy"], -e["val_loss"]))
    assert m["selected"] == best["config"] and m["val_accuracy"] == best["val_accuracy"]
    assert out["manifest"].method.rank == best["config"]["rank"]
    assert out["manifest"].hyperparameters["lr"] == best["config"]["lr"]
    # a configuration of the sweep trains as the same job alone (same initial weights, same batches)
    alone = next(e for e in m["sweep"] if e["config"] == {"lr": 0.05, "rank": 4})
    for ours, theirs in zip(untimed(alone["history"]), untimed(one["metrics"]["history"]), strict=True):
        assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-5)
    assert any("best of 4 configurations" in e["message"] for e in reporter.events)


class CancelAtEpoch(NullReporter):
    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def progress(self, stage: str, done: int, total: int, **extra) -> None:
        if done == self.epoch:
            raise Cancelled("job")


@pytest.mark.parametrize(
    "grid",
    [{"lr": [0.01, 0.05], "weight_decay": [0.0, 0.01]}, {"lr": [0.01, 0.05], "rank": [2, 4]}],
    ids=["one-architecture", "two-architectures"],
)
def test_an_interrupted_sweep_resumes_from_its_checkpoint(
    losa_cache: tuple[Settings, str], digits_root: Path, tmp_path: Path, grid: dict
) -> None:
    settings, key = losa_cache
    job = spec(digits_root / "train", sweep=grid, epochs=3)
    whole = train_job(job, settings, key, NullReporter(), tmp_path / "whole")
    with pytest.raises(Cancelled):
        train_job(job, settings, key, CancelAtEpoch(2), tmp_path / "cut")
    # what a resume reads is one file; the summary beside it is strict JSON
    summary = json.loads((tmp_path / "cut" / "checkpoint.json").read_text(), parse_constant=pytest.fail)
    assert summary["epoch"] == 1 and summary["best_epoch"] == 1 and len(summary["results"]) == 4
    tensors = read_tensors(tmp_path / "cut" / "checkpoint.safetensors")
    assert tensors["history"].shape[:2] == (4, 1)
    reporter = NullReporter()
    resumed = train_job(job, settings, key, reporter, tmp_path / "cut")
    assert any("resumed training from the checkpoint of epoch 1" in e["message"] for e in reporter.events)
    for ours, theirs in zip(resumed["metrics"]["sweep"], whole["metrics"]["sweep"], strict=True):
        assert untimed(ours["history"]) == untimed(theirs["history"]) and ours["config"] == theirs["config"]
    for name, value in whole["weights"].items():
        np.testing.assert_allclose(resumed["weights"][name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sweep", [None, {"lr": [0.1, 0.3]}], ids=["one-configuration", "sweep"])
def test_the_model_a_job_returns_is_its_best_epochs(
    losa_cache: tuple[Settings, str], digits_root: Path, tmp_path: Path, sweep: dict | None
) -> None:
    """With no test split, the returned model is evaluated on validation: it must score what its best epoch scored.
    (On the CPU the weights kept for the best epoch were once views of the live ones, so a job returned its last
    epoch's weights under its best epoch's score.) Learning rates this high make the later epochs worse."""
    settings, key = losa_cache
    job = spec(digits_root / "train", sweep=sweep, epochs=6, lr=0.1, weight_decay=0.0)
    out = train_job(job, settings, key, NullReporter(), tmp_path / "ckpt")
    m = out["metrics"]
    entries = m.get("sweep") or [m]
    assert any(e["best_epoch"] < len(e["history"]) for e in entries), "no configuration peaked before its last epoch"
    assert out["evaluation"]["split"] == "val"
    assert out["evaluation"]["metrics"]["val_accuracy"] == pytest.approx(m["val_accuracy"], abs=1e-5)
