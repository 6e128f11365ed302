"""The train/validation/test split of a dataset's labels (seeded, stratified per class; multi-label targets split
over all samples at once), the split a dataset brings with it (`given_split`: a Hugging Face dataset's own train,
validation and test splits), and the refusals of a split that leaves nothing to validate or test on. Torch-free.
"""

from __future__ import annotations

import numpy as np

from services.data.datasets import DatasetError


def val_count(n: int, val_fraction: float) -> int:
    """How many of a class's `n` samples `split` holds out for validation: round(n * val_fraction), at least one
    when there are two or more, and never all of them."""
    return min(max(int(round(n * val_fraction)), 1), n - 1) if n >= 2 else 0


def split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test), sorted and disjoint. Per class, a seeded shuffle; round(n * val_fraction) go
    to validation (at least one of any class with two or more samples), then round(n * test_fraction) to test (at
    least one when test_fraction > 0 and two are left), the rest to training. Without a test split this is the
    validation split of earlier versions, image for image. Multi-label targets [n, tags]: the same over all
    samples at once (seeded, not stratified)."""
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for idx in [np.arange(len(labels))] if labels.ndim == 2 else _by_class(labels):
        rng.shuffle(idx)
        n = len(idx)
        n_val = val_count(n, val_fraction)
        n_test = 0
        if test_fraction > 0 and n - n_val >= 2:
            n_test = min(max(int(round(n * test_fraction)), 1), n - n_val - 1)
        val.append(idx[:n_val])
        test.append(idx[n_val : n_val + n_test])
        train.append(idx[n_val + n_test :])
    return tuple(
        np.sort(np.concatenate([np.empty(0, np.int64), *part]).astype(np.int64)) for part in (train, val, test)
    )  # type: ignore[return-value]


def given_split(
    codes: np.ndarray, labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test) of a dataset's own split (`codes`: 0 train, 1 validation, 2 test per sample): its
    validation and test rows as they are; a part it lacks is drawn from its train rows as `split` draws it (seeded,
    stratified), test only where `test_fraction` asks for one."""
    pool = np.flatnonzero(codes == 0)
    val, test = np.flatnonzero(codes == 1), np.flatnonzero(codes == 2)
    empty = np.empty(0, np.int64)
    if not len(val):
        tr, va, te = split(labels[pool], val_fraction, 0.0 if len(test) else test_fraction, seed)
    elif not len(test) and test_fraction > 0:
        tr, te, _ = split(labels[pool], test_fraction, 0.0, seed)  # the held-out part drawn is the test split
        va = empty
    else:
        tr, va, te = np.arange(len(pool)), empty, empty
    return tuple(
        np.sort(np.concatenate([given, pool[drawn]])).astype(np.int64)
        for given, drawn in ((empty, tr), (val, va), (test, te))
    )  # type: ignore[return-value]


def _by_class(labels: np.ndarray) -> list[np.ndarray]:
    """Each class's indices in ascending order, classes in ascending order: `np.flatnonzero(labels == c)` for each
    class, from one stable sort (one pass per class is N x C: 21,843 classes of 14 million images would be hours)."""
    order = np.argsort(labels, kind="stable")
    _, counts = np.unique(labels, return_counts=True)
    return np.split(order, np.cumsum(counts)[:-1])


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) of `split` without a test split."""
    train, val, _ = split(labels, val_fraction, 0.0, seed)
    return train, val


def check_validation(labels: np.ndarray, val: np.ndarray, classes: list[str]) -> None:
    """Refuse an empty validation split (nothing to select the epoch, the configuration or the L2 strength on),
    saying what to change."""
    if len(val):
        return
    n = len(labels)
    if labels.ndim == 2:
        raise DatasetError(
            f"the validation split is empty: the dataset has {n} usable image(s); at least 2 are needed "
            "(one to train on, one to validate on)"
        )
    raise DatasetError(
        f"the validation split is empty: each of the {len(classes)} classes has a single usable image "
        f"({n} in all), and a class needs at least 2 for one to be held out for validation; add "
        "images (2 or more per class), or submit a dataset with more images per class"
    )


def check_test(labels: np.ndarray, test: np.ndarray, val_fraction: float, test_fraction: float) -> None:
    """Refuse a `test_fraction` that leaves no test image (a report would silently fall back to validation), naming
    how many images `split` needs at these fractions for one to be left to test on."""
    if test_fraction == 0 or len(test):
        return
    needed = next((n for n in range(3, 100_000) if n - val_count(n, val_fraction) >= 2), 100_000)
    multi = labels.ndim == 2
    have = int(len(labels) if multi else np.bincount(labels).max())
    raise DatasetError(
        f"dataset.test_fraction {test_fraction} leaves no test image: with val_fraction {val_fraction}, "
        f"{'the dataset' if multi else 'a class'} needs at least {needed} usable images for one to be "
        f"left to test on ({'it has' if multi else 'the largest has'} {have}); add images, set "
        "dataset.test to a separate test set, or leave test_fraction out",
        field="dataset.test_fraction",
    )
