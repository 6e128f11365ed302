"""The linear probe's protocol (services/training/probes.py, services/training/lbfgs.py): L2 strengths scored
by stratified k-fold cross-validation as scikit-learn's GridSearchCV scores them, the chosen strength refitted on every
training and validation image (and on nothing else: the test split never enters selection or the refit).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from services.data.datasets import read_imagefolder
from services.data.splits import split
from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from services.spec import JobSpec
from services.training import lbfgs as solver
from services.training.job import train_job
from services.training.objectives import Objective
from storage.settings import Settings


def blobs(n_per_class: int, classes: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes (so that the L2 strength matters), `n_per_class` rows each."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 0.6
    labels = np.repeat(np.arange(classes), n_per_class)
    x = centres[labels] + rng.normal(size=(len(labels), dim)) * rng.uniform(0.5, 3.0, size=dim)
    return x.astype(np.float32), labels


def test_cross_validation_and_refit_agree_with_scikit_learn_grid_search() -> None:
    x, labels = blobs(80, 4, 16, seed=0)
    k, seed, n = 5, 3, len(labels)
    objective = Objective(labels, 4, 0.0, "none", "cpu")
    xt, y = torch.from_numpy(x), objective.targets(labels)
    grid = solver.L2_GRID[4:13]  # 10^-1 .. 10^-5
    cv = solver.cross_validate(xt, y, labels, solver.folds(labels, k, seed), grid, objective, 1000)
    assert [p.l2 for p in cv] == sorted(grid, reverse=True) and all(len(p.fold_scores) == k for p in cv)

    # every fold fits 4/5 of the rows (16 of each class's 80), so C = 1 / (l2 x 256) on every fold
    cs = [1 / (p.l2 * n * (k - 1) / k) for p in cv]
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=10_000, tol=1e-6))
    folds = StratifiedKFold(k, shuffle=True, random_state=seed)
    with threadpool_limits(1):  # BLAS threads on shared cores: many times slower for problems this small
        search = GridSearchCV(pipe, {"logisticregression__C": cs}, cv=folds, refit=True).fit(x, labels)
    theirs = search.cv_results_["mean_test_score"]
    ours = np.array([p.score for p in cv])
    assert np.abs(ours - theirs).max() <= 0.01, (ours, theirs)
    assert np.allclose([p.std for p in cv], search.cv_results_["std_test_score"], atol=0.01)
    assert theirs[solver.choose(cv)] >= theirs.max() - 0.01  # our choice is (one of) theirs

    # the refit at their chosen C (the same C on all n rows: l2 = 1 / (C n)) predicts as their refitted estimator
    weight, bias, _ = solver.refit(xt, y, [1 / (search.best_params_["logisticregression__C"] * n)], objective, 1000)
    fresh, _ = blobs(50, 4, 16, seed=0)
    fresh += np.random.default_rng(1).normal(size=fresh.shape).astype(np.float32)
    probs = torch.softmax(torch.from_numpy(fresh @ weight.T + bias), 1).numpy()
    assert np.abs(probs - search.predict_proba(fresh)).max() < 0.02
    assert (probs.argmax(1) == search.predict(fresh)).mean() >= 0.99


def _noise(paths: list[Path], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for p in paths:
        size = Image.open(p).size
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)


def _job(root: Path, settings: Settings, test_fraction: float = 0.3, **method) -> dict:
    spec = JobSpec.model_validate(
        {
            "dataset": {"path": str(root), "test_fraction": test_fraction},
            "backbone": {"name": "test_vit", "pretrained": False, "image_size": 32},
            "method": {"name": "linear", **method},
        }
    )
    key = run_extraction(spec, settings, NullReporter())["cache_key"]
    return train_job(spec, settings, key, NullReporter(), settings.data_dir / "ckpt")


def test_refit_uses_every_labelled_non_test_image_and_never_the_test_split(digits_root: Path, tmp_path: Path) -> None:
    roots = {name: tmp_path / name for name in ("same", "test_noised", "val_noised")}
    for root in roots.values():
        shutil.copytree(digits_root / "train", root)
    ds = read_imagefolder(roots["same"])
    train, val, test = split(ds.labels, 0.2, 0.3, 0)
    _noise([roots["test_noised"] / p.relative_to(roots["same"]) for p in np.array(ds.paths)[test]], seed=0)
    _noise([roots["val_noised"] / np.array(ds.paths)[val[0]].relative_to(roots["same"])], seed=0)
    settings = Settings(data_dir=tmp_path / "data", allowed_roots=[tmp_path], device="cpu")
    out = {name: _job(root, settings) for name, root in roots.items()}

    m = out["same"]["metrics"]
    assert m["selection"]["protocol"] == "cross-validation" and m["selection"]["folds"] == 5
    assert m["selection"]["images"] == m["refit"]["images"] == len(train) + len(val)
    assert m["train_images"] + m["val_images"] == len(train) + len(val)
    assert len(m["selection"]["fold_scores"]) == 5 and m["selection"]["std"] >= 0
    assert m["test_images"] == len(test) and m["val_accuracy"] == m["selection"]["score"]
    # the refit's strength keeps scikit-learn's C: the chosen l2 x the rows a fold fits (about 4/5) / all rows
    n = len(train) + len(val)
    ratio = np.mean([n - len(h) for h in np.array_split(np.arange(n), 5)]) / n  # stratified folds: as many rows
    assert any(m["weight_decay"] == p["weight_decay"] for p in m["l2_path"])  # the grid's value, as a sweep names it
    assert m["refit"]["weight_decay"] == pytest.approx(m["weight_decay"] * ratio, rel=1e-4)

    # the test images changed: selection and weights are those of the untouched dataset, only the test figures move
    noised = out["test_noised"]
    assert noised["metrics"]["l2_path"] == m["l2_path"] and noised["metrics"]["selection"] == m["selection"]
    for name, w in out["same"]["weights"].items():
        np.testing.assert_allclose(noised["weights"][name], w, atol=1e-5)
    assert noised["metrics"]["test_accuracy"] < m["test_accuracy"]

    # one validation image changed: the refit read it, so the weights move
    moved = out["val_noised"]["weights"]["head.weight"]
    assert np.abs(moved - out["same"]["weights"]["head.weight"]).max() > 1e-4


def test_large_jobs_choose_on_the_validation_split_then_refit(digits_root: Path, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", allowed_roots=[digits_root.parent], device="cpu")
    m = _job(digits_root / "train", settings, cv_max_images=50)["metrics"]
    assert m["selection"]["protocol"] == "validation" and m["selection"]["folds"] == 0
    assert m["selection"]["images"] == m["val_images"] and "std" not in m["selection"]
    assert m["refit"]["images"] == m["train_images"] + m["val_images"]
    chosen = next(p for p in m["l2_path"] if p["val_accuracy"] == m["val_accuracy"])
    assert m["refit"]["weight_decay"] == pytest.approx(
        chosen["weight_decay"] * m["train_images"] / m["refit"]["images"], rel=1e-5
    )


def test_equal_held_out_figures_choose_the_strongest_and_nan_never_wins() -> None:
    # along the weak end of a warm-started path the scores tie and the losses differ by noise
    points = [
        solver.CvPoint(l2=l2, score=score, std=0.0, loss=loss, iterations=1, fold_scores=[score])
        for l2, score, loss in (
            (1.0, 0.90, 0.30),
            (0.1, float("nan"), 0.1),
            (0.01, 0.95, 0.2216),
            (0.001, 0.95, 0.2215),
            (0.0001, 0.95, 0.2214),
        )
    ]
    assert solver.choose(points) == 2
    assert solver.choose(points[:2]) == 0


def test_without_a_test_split_the_validation_report_is_of_a_model_that_never_saw_validation(
    digits_root: Path, tmp_path: Path
) -> None:
    """The saved model is refitted on the validation images too; the report on validation must not score it there
    (it did: a 1,000-class job's report showed one confusion in 1,000 images)."""
    settings = Settings(data_dir=tmp_path / "data", allowed_roots=[digits_root.parent], device="cpu")
    out = _job(digits_root / "train", settings, test_fraction=0.0, cv_max_images=50)
    m, report = out["metrics"], out["evaluation"]
    assert report["split"] == "val" and m["test_images"] == 0
    assert "training split" in m["refit"]["validation_judged_by"]
    # the validation protocol scored the chosen strength with a fit on the training split along the same path: the
    # report's model is that fit, so its accuracy is the selection's figure
    assert report["metrics"]["val_accuracy"] == pytest.approx(m["selection"]["score"], abs=1e-4)
