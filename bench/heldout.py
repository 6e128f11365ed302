"""Results on held-out data with default settings: sidetune's linear probe against scikit-learn's standard protocol,
and LoSA against the linear probe, each scored once on a 30% stratified test split that no training or selection saw.

All 1,797 of scikit-learn's digits, vit_tiny_patch16_224 (random init) at each `--sizes` resolution, for each of
`--seeds` (the split's seed and the training seed). Per size and seed:
- sidetune linear: the default job (`method: linear`: L-BFGS over the L2 grid scored by 5-fold cross-validation
  over the training and validation images, the best refitted on all of them);
- scikit-learn: `GridSearchCV(StandardScaler + LogisticRegression, C in 1e-3..1e4 (15 values), StratifiedKFold(5),
  refit=True)` on the same pooled features of the same training and validation images (BLAS limited to the torch
  thread count), as a user writes the protocol;
- LoSA (defaults): the default job (`method: losa`, every setting default: the automatic grid of 4 learning rates
  with early termination, `epochs: auto`);
- LoSA (one rate): the same job at the grid's middle rate alone (`training.lr` given: one configuration, the same
  epochs), the cost the automatic choice is measured against;
- auto: the default job of `method: auto` (the probe and LoSA's grid from the same cache, the better on validation).
And a video row (`--video-per-class`, 0 skips it): the demo's motion task (`sidetune demo --video`: a square moving
left, right, up or down, told apart only by the order of frames) on vit_tiny made a ViViT of 8 frames at 64 px, LoSA
with defaults, scored on separately drawn held-out videos.
`seconds` is the training alone (sidetune's `train_seconds`, scikit-learn's search and refit); features are
extracted once per size beforehand (the backbone forward is the same for every row).

Last line: `probe_vs_gridsearch_<px>=` (test accuracy points, sidetune minus scikit-learn, mean over seeds),
`probe_vs_gridsearch_min_<px>=` (the worst seed), `losa_vs_probe_<px>=` (points, LoSA minus the probe, mean),
`probe_speedup_<px>=` (scikit-learn seconds / sidetune seconds, mean), `auto_lr_cost_<px>=` (seconds of LoSA's default
job / seconds of its one rate alone, mean), `auto_vs_best_<px>=` (points, `auto` minus the better of the probe and LoSA
on each seed, mean), `auto_cost_<px>=` (seconds of `auto` / seconds of LoSA's default job, mean), `video_losa_test=`
(held-out accuracy, with the video row), `device=`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import common
import numpy as np

C_GRID = np.logspace(-3, 4, 15)


def gridsearch(
    features: np.ndarray, labels: np.ndarray, fit: np.ndarray, test: np.ndarray, seed: int, threads: int
) -> dict[str, Any]:
    """scikit-learn's protocol on the training and validation rows `fit`, scored once on `test`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    with threadpool_limits(threads):
        t0 = time.perf_counter()
        search = GridSearchCV(pipe, {"logisticregression__C": C_GRID}, cv=folds, refit=True)
        search.fit(features[fit], labels[fit])
        seconds = time.perf_counter() - t0
    return {
        "val": search.best_score_,
        "test": search.score(features[test], labels[test]),
        "seconds": seconds,
        "note": f"C={search.best_params_['logisticregression__C']:.3g}",
    }


def run_size(args: argparse.Namespace, size: int, seed: int, settings, dataset) -> dict[str, dict[str, Any]]:
    import torch

    from services import methods
    from services.data.splits import split
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter
    from services.methods.readout import FeatureInfo
    from services.spec import JobSpec
    from storage.cache import FeatureCache

    def spec(method: dict) -> JobSpec:
        return JobSpec.model_validate(
            {
                "dataset": {"path": str(dataset), "test_fraction": 0.3, "split_seed": seed},
                "backbone": {"name": args.backbone, "pretrained": False, "image_size": size},
                "method": method,
                "training": {"seed": seed},
                "extraction": {"batch_size": 128},
            }
        )

    rows: dict[str, dict[str, Any]] = {}

    def job(name: str, job_spec: JobSpec) -> dict[str, Any]:
        key = run_extraction(job_spec, settings, NullReporter())["cache_key"]
        out, _ = common.train_fresh(job_spec, settings, key, args.work / "ckpt")
        m = out["metrics"]
        note = m.get("selected") or (f"weight_decay={m['weight_decay']:.3g}" if "l2_path" in m else "")
        rows[name] = {
            "val": m["val_accuracy"],
            "test": m["test_accuracy"],
            "seconds": m["train_seconds"],
            "note": str(note),
        }
        common.say(f"{size} px seed {seed} {name}: test {m['test_accuracy']:.4f} in {m['train_seconds']:.2f}s")
        return out | {"key": key}

    linear = job("sidetune linear", spec({"name": "linear"}))  # in a warm process, as a train worker is (warm_up)
    entry = FeatureCache(settings.cache_location).entry(linear["key"])
    labels = entry.labels()
    probe = methods.build(
        spec({"name": "linear"}).method,
        FeatureInfo.from_meta(entry.meta, entry.readout(), len(entry.meta["classes"]), entry.meta["token_mode"]),
    )
    with torch.no_grad():
        features = probe.features(torch.from_numpy(entry.read(None, linear["manifest"].input_layers))).numpy()
    train, val, test = split(labels, 0.2, 0.3, seed)
    row = gridsearch(features, labels, np.concatenate([train, val]), test, seed, torch.get_num_threads())
    rows["scikit-learn GridSearchCV"] = row
    common.say(f"{size} px seed {seed} scikit-learn: test {row['test']:.4f} in {row['seconds']:.2f}s")
    losa = job("LoSA (defaults)", spec({"name": "losa"}))
    middle = spec({"name": "losa"}).training.auto_lr(losa_defaults())
    one = spec({"name": "losa"}).model_dump()
    job("LoSA (one rate)", JobSpec.model_validate({**one, "training": {**one["training"], "lr": middle}}))
    rows["LoSA (defaults)"]["note"] += f" of {losa['metrics']['automatic_lr']['lrs']}"
    auto = job("auto", spec({"name": "auto"}))
    rows["auto"]["note"] = f"{auto['metrics']['auto']['selected']} kept"
    return rows


def losa_defaults() -> dict[str, Any]:
    from services.methods.losa.config import LosaConfig

    return LosaConfig().training_defaults()


def video_row(args: argparse.Namespace, settings) -> dict[str, Any]:
    """LoSA with defaults on the demo's motion videos, scored on held-out videos drawn apart."""
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter
    from services.spec import JobSpec
    from services.video.synthetic import write_motion

    root = args.work / "datasets" / "motion"
    write_motion(root, args.video_per_class, holdout_per_class=max(1, args.video_per_class // 4))
    spec = JobSpec.model_validate(
        {
            "dataset": {"path": str(root / "train"), "test": str(root / "holdout")},
            "backbone": {
                "name": args.backbone,
                "pretrained": False,
                "image_size": 64,
                "video": {"num_frames": 8, "tubelet": 2, "init": "filter_inflation"},
            },
            "method": {"name": "losa"},
            "extraction": {"batch_size": 32},
        }
    )
    key = run_extraction(spec, settings, NullReporter())["cache_key"]
    out, _ = common.train_fresh(spec, settings, key, args.work / "ckpt")
    m = out["metrics"]
    common.say(f"video LoSA (defaults): test {m['test_accuracy']:.4f} in {m['train_seconds']:.2f}s")
    return {
        "val": m["val_accuracy"],
        "test": m["test_accuracy"],
        "seconds": m["train_seconds"],
        "note": f"{m['selected']} of {m['automatic_lr']['lrs']}, {m['epochs']} epochs",
    }


# --smoke: 100 digits at 32 px with timm's 6-block test ViT (about 6 a class to train on, 5-fold
# cross-validation needs 5), one seed, 4 motion videos a class
SMOKE = {"sizes": [32], "seeds": [0], "backbone": "test_vit", "limit": 100, "video_per_class": 4}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 112])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--backbone", default="vit_tiny_patch16_224", help="timm ViT, random init")
    p.add_argument("--limit", type=int, help="digits written (default: all 1,797)")
    p.add_argument("--threads", type=int, help="torch threads, and scikit-learn's BLAS threads (default: torch's)")
    p.add_argument("--data-dir", help="working dir (default: a temporary dir, removed after)")
    p.add_argument("--video-per-class", type=int, default=40, help="motion videos per class (0: no video row)")
    args = common.parse_with_smoke(p, argv, SMOKE)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from services.training.runs import warm_up

    warm_up()  # as a train worker does when it starts: the first optimizer's one-off import is not a job's cost
    load_start = common.load_average()
    results: dict[int, list[dict[str, dict[str, Any]]]] = {}
    with common.workdir(args.data_dir, "sidetune-heldout-") as work:
        args.work = work
        from services.data.digits import write_digits

        # every image in train/: the jobs hold out their own test split
        write_digits(work / "datasets" / "digits", holdout_fraction=0.0, limit=args.limit)
        settings = common.make_settings(work, work, "cpu")
        for size in args.sizes:
            results[size] = [
                run_size(args, size, seed, settings, work / "datasets" / "digits" / "train") for seed in args.seeds
            ]
        video = video_row(args, settings) if args.video_per_class else None

    headers = ["px", "model", *(f"test seed {s}" for s in args.seeds), "mean", "seconds", "chosen (seed 0)"]
    table, kv = [], {}
    for size, per_seed in results.items():
        for name in per_seed[0]:
            tests = [rows[name]["test"] for rows in per_seed]
            table.append(
                [
                    str(size),
                    name,
                    *(common.fmt(t, 4) for t in tests),
                    common.fmt(float(np.mean(tests)), 4),
                    common.fmt(float(np.mean([rows[name]["seconds"] for rows in per_seed])), 2),
                    per_seed[0][name]["note"],
                ]
            )
        gaps = [
            100 * (rows["sidetune linear"]["test"] - rows["scikit-learn GridSearchCV"]["test"]) for rows in per_seed
        ]
        losa = [100 * (rows["LoSA (defaults)"]["test"] - rows["sidetune linear"]["test"]) for rows in per_seed]
        speed = [
            common.ratio(rows["scikit-learn GridSearchCV"]["seconds"], rows["sidetune linear"]["seconds"])
            for rows in per_seed
        ]
        cost = [
            common.ratio(rows["LoSA (defaults)"]["seconds"], rows["LoSA (one rate)"]["seconds"]) for rows in per_seed
        ]
        common.put(kv, f"probe_vs_gridsearch_{size}", float(np.mean(gaps)), 2)
        common.put(kv, f"probe_vs_gridsearch_min_{size}", min(gaps), 2)
        common.put(kv, f"losa_vs_probe_{size}", float(np.mean(losa)), 2)
        common.put(kv, f"probe_speedup_{size}", float(np.mean(speed)), 2)
        common.put(kv, f"auto_lr_cost_{size}", float(np.mean(cost)), 2)
        best = [
            100 * (rows["auto"]["test"] - max(rows["sidetune linear"]["test"], rows["LoSA (defaults)"]["test"]))
            for rows in per_seed
        ]
        common.put(kv, f"auto_vs_best_{size}", float(np.mean(best)), 2)
        common.put(
            kv,
            f"auto_cost_{size}",
            float(
                np.mean(
                    [common.ratio(rows["auto"]["seconds"], rows["LoSA (defaults)"]["seconds"]) for rows in per_seed]
                )
            ),
            2,
        )
    if video is not None:
        table.append(
            [
                "64",
                "video: LoSA (defaults)",
                common.fmt(video["test"], 4),
                *[""] * (len(args.seeds) - 1),
                common.fmt(video["test"], 4),
                common.fmt(video["seconds"], 2),
                video["note"],
            ]
        )
        common.put(kv, "video_losa_test", video["test"], 4)
    print(
        f"Held-out digits ({args.limit or 1797} images; 30% test, 20% validation, stratified, seeds {args.seeds}): "
        f"{args.backbone}, random init; every job with default settings"
    )
    print(common.render(headers, table, left=2))
    print(common.machine_line(load_start))
    common.print_kv({**kv, "device": "cpu"})


if __name__ == "__main__":
    main()
