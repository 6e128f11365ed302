"""The evidence for LoSA's `lr: auto` rule: for each dataset size and batch size, a wide sweep of learning rates
(factors of 2) trained from one cache pass, every configuration to the end (no early termination), `epochs: auto`;
the best rate on validation, where the rule's grid (0.1 x sqrt(batch / 64) x 0.25, 0.5, 1, 2) lies, and the test
accuracy of the default job (the grid, stopped early) against the wide sweep's pick.

Digits (scikit-learn's, `--limits` images each), vit_tiny_patch16_224 random init at `--size` px, a 30% stratified
test split; one seed.

Last line: `best_in_grid=` (the share of (images, batch) cells whose best rate on validation is one of the grid's),
`default_vs_wide=` (test points, the default job minus the wide sweep's pick, mean over cells), `device=`.
"""

from __future__ import annotations

import argparse
from typing import Any

import common
import numpy as np

WIDE = [0.00625 * 2**i for i in range(8)]  # 0.00625 .. 0.8


def cell(args: argparse.Namespace, settings, root, limit: int, batch: int) -> dict[str, Any]:
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter
    from services.spec import JobSpec

    def spec(sweep: list[float] | None = None) -> JobSpec:
        return JobSpec.model_validate(
            {
                "dataset": {"path": str(root / "train"), "test_fraction": 0.3, "split_seed": args.seed},
                "backbone": {"name": args.backbone, "pretrained": False, "image_size": args.size},
                "method": {"name": "losa"},
                "extraction": {"batch_size": 128},
                "training": {
                    "batch_size": batch,
                    "seed": args.seed,
                    **({"epochs": args.epochs} if args.epochs else {}),
                },
                **({"sweep": {"lr": sweep}} if sweep else {}),
            }
        )

    wide = spec(WIDE)  # a sweep you list: early termination off, every rate trained to the end
    key = run_extraction(wide, settings, NullReporter())["cache_key"]
    out, _ = common.train_fresh(wide, settings, key, args.work / "ckpt")
    m = out["metrics"]
    vals = [e["val_accuracy"] for e in m["sweep"]]
    default = spec()
    d, _ = common.train_fresh(default, settings, key, args.work / "ckpt")
    grid = default.automatic_lrs()
    best = m["selected"]["lr"]
    common.say(
        f"{limit} images, batch {batch}: best {best:g}, grid {grid}, default test "
        f"{d['metrics']['test_accuracy']:.4f} vs wide {m['test_accuracy']:.4f}"
    )
    return {
        "vals": vals,
        "best": best,
        "grid": grid,
        "in_grid": any(abs(best - g) / g < 0.02 for g in grid),
        "epochs": m["epochs"],
        "wide_test": m["test_accuracy"],
        "default_test": d["metrics"]["test_accuracy"],
        "default_lr": d["metrics"]["selected"]["lr"],
    }


# --smoke: one cell (100 digits, batch 32) at 32 px with timm's 6-block test ViT, 4 epochs
SMOKE = {"limits": [100], "batches": [32], "size": 32, "epochs": 4, "backbone": "test_vit"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limits", type=int, nargs="+", default=[300, 1797], help="digits per dataset")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help="epochs of every job (default: auto, as a user who passes nothing)")
    p.add_argument("--backbone", default="vit_tiny_patch16_224", help="timm ViT, random init")
    p.add_argument("--data-dir", help="working dir (default: a temporary dir, removed after)")
    args = common.parse_with_smoke(p, argv, SMOKE)
    from services.training.runs import warm_up

    warm_up()
    load_start = common.load_average()
    rows, cells = [], []
    with common.workdir(args.data_dir, "sidetune-lr-rule-") as work:
        args.work = work
        from services.data.digits import write_digits

        settings = common.make_settings(work, work, "cpu")
        for limit in args.limits:
            root = work / "datasets" / f"digits{limit}"
            write_digits(root, holdout_fraction=0.0, limit=limit if limit < 1797 else None)
            for batch in args.batches:
                c = cell(args, settings, root, limit, batch)
                cells.append(c)
                default = f"{common.fmt(c['default_test'], 4)} ({c['default_lr']:g})"
                rows.append(
                    [
                        str(limit),
                        str(batch),
                        str(c["epochs"]),
                        *(common.fmt(v, 3) for v in c["vals"]),
                        f"{c['best']:g}",
                        f"{c['grid'][0]:g}-{c['grid'][-1]:g}",
                        "yes" if c["in_grid"] else "no",
                        common.fmt(c["wide_test"], 4),
                        default,
                    ]
                )
    headers = [
        "images",
        "batch",
        "epochs",
        *(f"val {lr:g}" for lr in WIDE),
        "best",
        "grid",
        "in grid",
        "test: wide pick",
        "test: default (lr)",
    ]
    print(
        f"LoSA learning rates on digits at {args.size} px ({args.backbone}, random init, 30% test, seed "
        f"{args.seed}); validation accuracy of each rate of a wide sweep, every rate trained to the end"
    )
    print(common.render(headers, rows, left=2))
    print(common.machine_line(load_start))
    kv: dict[str, str] = {}
    common.put(kv, "best_in_grid", float(np.mean([c["in_grid"] for c in cells])), 2)
    common.put(kv, "default_vs_wide", float(np.mean([100 * (c["default_test"] - c["wide_test"]) for c in cells])), 2)
    common.print_kv({**kv, "device": "cpu"})


if __name__ == "__main__":
    main()
