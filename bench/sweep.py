"""Sweeps from one cache: what K configurations trained by one job cost against one configuration.

Two caches of the same digits (the last block's pooled token for linear heads; every layer and token for LoSA) are
extracted once. Then, each as one `train_job` from its cache:
- linear heads (`method.solver: sgd`, mini-batch heads as dinov2 trains its 52 at once): K = 1, 8, 32
  configurations of lr x weight_decay;
- LoSA: K = 1, 4, 8 configurations of lr x weight_decay (one architecture: stacked under vmap);
- optionally (`--streamed`) LoSA K = 1 and 8 with the features streamed from the cache per batch
  (train_memory_mb 0), where the shared reads matter most.
K = 1 is an ordinary job (one module, torch's optimizer). Each row reports the training loop's wall time (`fit`:
every epoch's steps, validation and checkpoint), the whole train step's (`job`: loading the features, the loop,
the test evaluation, the plots), the calls to CacheEntry.read during the loop, and the best validation accuracy.
The headline ratios are loop time at K over loop time at K = 1 from the same run (targets: 32 linear heads <= 2x
one; 8 LoSA configurations <= 6x one).

Last line: `sweep_linear_32_vs_1=`, `sweep_losa_8_vs_1=`, then the other ratios, the job-time ratios and `device=`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import common

LINEAR_LR = [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
LINEAR_WD = [0.0, 1e-4, 1e-3, 1e-2]
LOSA_LR = [0.003, 0.01, 0.03, 0.1]
LOSA_WD = [0.0, 1e-4]


def grids(kind: str, k: int) -> dict[str, list[float]] | None:
    """The sweep of K configurations (None: K = 1, a plain job)."""
    lrs, wds = (LINEAR_LR, LINEAR_WD) if kind == "linear" else (LOSA_LR, LOSA_WD)
    n_wd = min(len(wds), max(1, k // len(lrs)) if k >= len(lrs) else 1) if k > 1 else 1
    n_lr = k // n_wd
    if k == 1:
        return None
    if n_lr > len(lrs) or n_lr * n_wd != k:
        raise SystemExit(f"no {kind} grid of {k} configurations here")
    return {"lr": lrs[:n_lr], "weight_decay": wds[:n_wd]}


def spec_for(args: argparse.Namespace, kind: str, k: int, dataset: Path):
    from services.spec import JobSpec

    method = {"name": "linear", "solver": "sgd"} if kind == "linear" else {"name": "losa", "rank": args.rank}
    sweep = grids(kind, k)
    lr = (0.1 if kind == "linear" else 0.03) if sweep is None else "auto"
    return JobSpec.model_validate(
        {
            "dataset": {"path": str(dataset), "test_fraction": 0.2},
            "backbone": {"name": args.backbone, "pretrained": False, "image_size": args.image_size},
            "method": method,
            "extraction": {"batch_size": 64},
            "training": {
                "epochs": args.linear_epochs if kind == "linear" else args.epochs,
                "batch_size": args.batch_size,
                "lr": lr,
                "weight_decay": 0.0,
            },
            **({"sweep": sweep} if sweep else {}),
        }
    )


class Counter:
    """Times services.training.fit.fit (as services.training.job calls it) and counts CacheEntry.read calls while it
    runs."""

    def __init__(self) -> None:
        import services.training.job as training
        from storage.cache import CacheEntry

        self.training, self.entry_cls = training, CacheEntry
        self.fit, self.read = training.fit, CacheEntry.read
        self.fit_s, self.reads, self.inside = 0.0, 0, False

    def __enter__(self) -> Counter:
        counter = self

        def read(entry: Any, *a: Any, **kw: Any) -> Any:
            counter.reads += counter.inside
            return counter.read(entry, *a, **kw)

        def fit(*a: Any, **kw: Any) -> Any:
            counter.inside, t0 = True, time.perf_counter()
            try:
                return counter.fit(*a, **kw)
            finally:
                counter.fit_s, counter.inside = time.perf_counter() - t0, False

        self.entry_cls.read, self.training.fit = read, fit
        return self

    def __exit__(self, *exc: object) -> None:
        self.entry_cls.read, self.training.fit = self.read, self.fit


def run_row(args: argparse.Namespace, kind: str, k: int, settings, key: str, dataset: Path) -> dict[str, Any]:
    spec = spec_for(args, kind, k, dataset)
    with Counter() as counter:
        t0 = time.perf_counter()
        out, inputs = common.train_fresh(spec, settings, key, args.work / "ckpt")
        job_s = time.perf_counter() - t0
    m = out["metrics"]
    return {
        "fit_s": counter.fit_s,
        "job_s": job_s,
        "reads": counter.reads,
        "val": m["val_accuracy"],
        "test": m.get("test_accuracy"),
        "inputs": inputs,
        "selected": m.get("selected"),
    }


# --smoke: timm's 6-block test ViT at 32 px on 60 digits, every row (the streamed ones too) for one epoch (linear
# heads two)
SMOKE = {
    "backbone": "test_vit",
    "image_size": 32,
    "limit": 60,
    "epochs": 1,
    "linear_epochs": 2,
    "batch_size": 16,
    "streamed": True,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, cpu_limit=600)
    p.add_argument("--epochs", type=int, default=5, help="LoSA epochs")
    p.add_argument("--linear-epochs", type=int, default=30, help="linear-head epochs (a step costs microseconds)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rank", type=int, default=8, help="LoSA rank")
    p.add_argument("--repeats", type=int, default=1, help="rounds; each row reports the median")
    p.add_argument("--streamed", action="store_true", help="add LoSA rows with the features streamed from the cache")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = common.parse_with_smoke(p, argv, SMOKE)
    gpu = common.resolve_defaults(args, cpu_limit=600)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = common.load_average()
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter

    with common.workdir(args.data_dir, "sidetune-sweep-") as work:
        args.work = work
        common.write_digits(work, args.limit)
        dataset = common.digits_dir(work)
        settings = common.make_settings(work, work, args.device, args.train_memory_mb)
        keys = {
            kind: run_extraction(spec_for(args, kind, 1, dataset), settings, NullReporter())["cache_key"]
            for kind in ("linear", "losa")
        }
        plan = [("linear", k, settings) for k in (1, 8, 32)] + [("losa", k, settings) for k in (1, 4, 8)]
        if args.streamed:
            streamed = settings.model_copy(update={"train_memory_mb": 0})
            plan += [("losa-streamed", k, streamed) for k in (1, 8)]
        results: dict[tuple[str, int], list[dict]] = {}
        for r in range(args.repeats):
            for kind, k, s in plan:
                base = kind.split("-")[0]
                row = run_row(args, base, k, s, keys[base], dataset)
                results.setdefault((kind, k), []).append(row)
                common.say(
                    f"[{r + 1}/{args.repeats}] {kind} K={k}: loop {row['fit_s']:.2f}s, job {row['job_s']:.2f}s, "
                    f"{row['reads']} cache reads, val acc {row['val']:.3f}"
                )

    med = {
        key: {f: common.median([r[f] for r in rows]) for f in ("fit_s", "job_s")} | rows[-1]
        for key, rows in results.items()
    }
    headers = [
        "configurations",
        "K",
        "loop s",
        "loop vs K=1",
        "job s",
        "job vs K=1",
        "cache reads",
        "best val acc",
        "test acc",
        "selected",
    ]
    rows, kv = [], {}
    for (kind, k), m in med.items():
        one = med[(kind, 1)]
        loop_ratio, job_ratio = common.ratio(m["fit_s"], one["fit_s"]), common.ratio(m["job_s"], one["job_s"])
        rows.append(
            [
                kind,
                str(k),
                common.fmt(m["fit_s"], 2),
                common.fmt(loop_ratio, 2),
                common.fmt(m["job_s"], 2),
                common.fmt(job_ratio, 2),
                str(m["reads"]),
                common.fmt(m["val"], 3),
                common.fmt(m["test"], 3),
                str(m["selected"] or ""),
            ]
        )
        if k > 1:
            slug = kind.replace("-", "_")
            common.put(kv, f"sweep_{slug}_{k}_vs_1", loop_ratio, 2)
            common.put(kv, f"job_{slug}_{k}_vs_1", job_ratio, 2)
    print(
        f"Sweeps from one cache: {args.backbone} at {args.image_size} px (random init), {args.limit} digits "
        f"(20% validation, 20% test), {args.epochs} epochs (linear heads {args.linear_epochs}), batch "
        f"{args.batch_size}, LoSA rank {args.rank}; "
        f"linear heads lr x weight_decay from {LINEAR_LR} x {LINEAR_WD}, LoSA from {LOSA_LR} x {LOSA_WD}; "
        f"median of {args.repeats} round(s); inputs: {med[('losa', 1)]['inputs']}"
    )
    print(common.render(headers, rows))
    print(
        "loop: the epochs (steps, validation, checkpoint) that K configurations share; job: the whole train step. "
        "cache reads: CacheEntry.read calls during the loop (features held in memory are read once, before it)."
    )
    print(common.machine_line(load_start))
    first = {k: kv.pop(k) for k in ("sweep_linear_32_vs_1", "sweep_losa_8_vs_1")}
    common.print_kv({**first, **kv, "device": "cuda" if gpu else "cpu"})


if __name__ == "__main__":
    main()
