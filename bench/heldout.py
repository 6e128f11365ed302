"""Results on held-out data: sidetune's linear probe against scikit-learn, LoSA, and the best configuration of a
LoSA sweep, all scored once on the same 30% stratified test split that no training or selection saw.

All 1,797 of scikit-learn's digits, vit_tiny_patch16_224 (random init) at each `--sizes` resolution. Per size:
- sidetune linear: the default job (`method: linear`, L-BFGS over the L2 grid, chosen on validation);
- scikit-learn: LogisticRegression (lbfgs, max_iter 1000) on the same pooled features standardised with the
  training split's statistics, C from 15 values in 1e-3..1e4 chosen on the same validation split (ties: the lower
  validation log-loss), as a user writes it (`cold`: each C from zero) and along a warm-started path (`warm`);
  BLAS limited to the torch thread count;
- LoSA: the default job (rank 16, 10 epochs, lr 0.05 x batch / 512);
- LoSA sweep: lr x rank (`--sweep-lr`, `--sweep-rank`) in one job; its selected configuration.
`seconds` is the training alone: the solve or the loop (sidetune's `train_seconds`, scikit-learn's fits); features
are extracted once beforehand (the backbone forward is the same for every row).

Last line: `probe_vs_sklearn_<px>=` (test accuracy points, sidetune minus scikit-learn cold), `probe_speedup_<px>=`
(scikit-learn cold seconds / sidetune seconds), `probe_speedup_warm_<px>=`, `test_<row>_<px>=`, `device=`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import common
import numpy as np

C_GRID = np.logspace(-3, 4, 15)


def sklearn_rows(features: np.ndarray, labels: np.ndarray, parts: tuple, threads: int) -> dict[str, dict[str, Any]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    train, val, test = parts
    x = StandardScaler().fit(features[train]).transform(features)
    out = {}
    for name, warm in (("cold", False), ("warm", True)):
        fits, model = [], LogisticRegression(max_iter=1000, warm_start=warm)
        with threadpool_limits(threads):
            t0 = time.perf_counter()
            for c in C_GRID:
                if not warm:
                    model = LogisticRegression(max_iter=1000)
                model.set_params(C=c).fit(x[train], labels[train])
                proba = model.predict_proba(x[val])
                loss = -np.log(proba[np.arange(len(val)), labels[val]] + 1e-12).mean()
                fits.append((model.score(x[val], labels[val]), -loss, model.score(x[test], labels[test]), c))
            seconds = time.perf_counter() - t0
        val_acc, _, test_acc, c = max(fits, key=lambda f: f[:2])
        out[name] = {"val": val_acc, "test": test_acc, "seconds": seconds, "note": f"C={c:.3g}"}
    return out


def run_size(args: argparse.Namespace, size: int, settings, dataset) -> dict[str, dict[str, Any]]:
    import torch

    from services import methods
    from services.data.datasets import split
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter
    from services.methods.readout import FeatureInfo
    from services.spec import JobSpec
    from storage.cache import FeatureCache

    def spec(method: dict, **extra: Any) -> JobSpec:
        return JobSpec.model_validate({
            "dataset": {"path": str(dataset), "test_fraction": 0.3},
            "backbone": {"name": "vit_tiny_patch16_224", "pretrained": False, "image_size": size},
            "method": method, "extraction": {"batch_size": 128}, **extra,
        })  # fmt: skip

    rows: dict[str, dict[str, Any]] = {}

    def job(name: str, job_spec: JobSpec) -> dict[str, Any]:
        key = run_extraction(job_spec, settings, NullReporter())["cache_key"]
        out, _ = common.train_fresh(job_spec, settings, key, args.work / "ckpt")
        m = out["metrics"]
        note = m.get("selected") or (f"weight_decay={m['weight_decay']:.3g}" if "l2_path" in m else "")
        rows[name] = {"val": m["val_accuracy"], "test": m["test_accuracy"], "seconds": m["train_seconds"],
                      "note": str(note)}  # fmt: skip
        common.say(f"{size} px {name}: test {m['test_accuracy']:.4f} in {m['train_seconds']:.2f}s")
        return out | {"key": key}

    linear = job("sidetune linear", spec({"name": "linear"}))  # in a warm process, as a train worker is (warm_up)
    entry = FeatureCache(settings.cache_location).entry(linear["key"])
    labels = entry.labels()
    probe = methods.build(spec({"name": "linear"}).method, FeatureInfo.from_meta(
        entry.meta, entry.readout(), 10, entry.meta["token_mode"]))  # fmt: skip
    with torch.no_grad():
        features = probe.features(torch.from_numpy(entry.read(None, linear["config"]["input_layers"]))).numpy()
    for name, row in sklearn_rows(features, labels, split(labels, 0.2, 0.3, 0), torch.get_num_threads()).items():
        rows[f"scikit-learn ({name})"] = row
        common.say(f"{size} px scikit-learn {name}: test {row['test']:.4f} in {row['seconds']:.2f}s")
    job("LoSA", spec({"name": "losa"}, training={"epochs": args.epochs}))
    sweep = {"lr": args.sweep_lr, "rank": args.sweep_rank}
    job("LoSA sweep (selected)", spec({"name": "losa"}, training={"epochs": args.epochs}, sweep=sweep))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 112])
    p.add_argument("--epochs", type=int, default=10, help="LoSA epochs")
    p.add_argument("--sweep-lr", type=float, nargs="+", default=[0.0125, 0.05])
    p.add_argument("--sweep-rank", type=int, nargs="+", default=[8, 16])
    p.add_argument("--threads", type=int, help="torch threads, and scikit-learn's BLAS threads (default: torch's)")
    p.add_argument("--data-dir", help="working dir (default: a temporary dir, removed after)")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from services.training.runs import warm_up

    warm_up()  # as a train worker does when it starts: the first optimizer's one-off import is not a job's cost
    load_start = common.load_average()
    results = {}
    with common.workdir(args.data_dir, "sidetune-heldout-") as work:
        args.work = work
        from services.data.digits import write_digits

        write_digits(work / "datasets" / "digits", holdout_fraction=0.0)  # the jobs hold out their own test split
        settings = common.make_settings(work, work, "cpu")
        for size in args.sizes:
            results[size] = run_size(args, size, settings, work / "datasets" / "digits" / "train")

    headers = ["px", "model", "val acc", "test acc", "seconds", "chosen"]
    table, kv = [], {}
    for size, rows in results.items():
        for name, r in rows.items():
            table.append([str(size), name, common.fmt(r["val"], 4), common.fmt(r["test"], 4),
                          common.fmt(r["seconds"], 2), r["note"]])  # fmt: skip
        ours, cold, warm = rows["sidetune linear"], rows["scikit-learn (cold)"], rows["scikit-learn (warm)"]
        common.put(kv, f"probe_vs_sklearn_{size}", 100 * (ours["test"] - cold["test"]), 2)
        common.put(kv, f"probe_speedup_{size}", common.ratio(cold["seconds"], ours["seconds"]), 2)
        common.put(kv, f"probe_speedup_warm_{size}", common.ratio(warm["seconds"], ours["seconds"]), 2)
        for name, slug in (("LoSA", "losa"), ("LoSA sweep (selected)", "sweep")):
            common.put(kv, f"test_{slug}_{size}", rows[name]["test"], 4)
    print(f"Held-out digits (1,797 images; 30% test, 20% validation, stratified, seed 0): vit_tiny_patch16_224, random "
          f"init; LoSA {args.epochs} epochs; sweep lr {args.sweep_lr} x rank {args.sweep_rank}")  # fmt: skip
    print(common.render(headers, table, left=2))
    print(common.machine_line(load_start))
    common.print_kv({**kv, "device": "cpu"})


if __name__ == "__main__":
    main()
