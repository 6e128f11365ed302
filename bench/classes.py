"""Scale in the number of classes (issue 19): a linear probe on an ImageFolder of C classes x 2 tiny images, trained,
evaluated, plotted and saved end to end, with the seconds and the peak resident memory of every stage.

The in-process pipeline, not the real stack: per class count, one child process extracts (`run_extraction`, as the
extract worker does) and another trains (`train_job`, then the model saved with its evaluation.json and plots as the
train step saves them, `pipeline.model_files`), each in its own process as the two workers are, with glibc's heap
caching off (common.MEMORY_ENV) so that RSS follows live memory. The stages inside `train_job` are told apart by the
events it reports (inputs loaded, L-BFGS solved, model evaluated); each stage's peak is the kernel's VmHWM, reset
when the stage starts (common.PeakRSS), so the peaks are measured, not sampled.

The backbone is vit_tiny_patch16_224 with random weights (`pretrained=False`) at `--image-size` px (32: four patch
tokens), so extraction is cheap and the classifier dominates. Up to `--full-solve` classes the probe is the default
job (L2 strengths `auto`, L-BFGS max_iter 1000); above, one L2 strength (1e-3) and `--large-max-iter` iterations,
because an L-BFGS iteration over 21,843 classes costs seconds on a CPU (the memory per iteration is what is measured;
accuracy on random images means nothing). The ceiling the train peak is compared with: the bytes the job itself must
hold, its pooled features (train and validation, float32) and its classifier (C x (D + 1) float32), measured from the
run; `rss_ratio_<C>` = peak above the process's baseline after imports / those bytes (L-BFGS keeps 2 x 10 history
vectors the size of the classifier, so about 20+ at large C is its design, not a leak).

    python bench/classes.py                        # 1,000 and 21,843 classes (about 15 minutes on 2 CPU cores)
    python bench/classes.py --smoke                # seconds: 120 classes (the smoke test)

Last line: `peak_rss_mb_<C>=` (the training process), `extract_peak_rss_mb_<C>=`, `rss_ratio_<C>=`, `seconds_<C>=`
(extraction and training), `evaluation_kb_<C>=` (evaluation.json), `confusion_px_<C>=` (the plot's canvas).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import common
import numpy as np

BACKBONE = "vit_tiny_patch16_224"
STAGES = ("load", "solve", "evaluate", "plot", "save")
ENDS = {"training ": "load", "L-BFGS linear probe": "solve", "selected model": "evaluate"}  # event -> stage it ends


def write_folder(root: Path, classes: int, per_class: int, pixels: int) -> None:
    """`classes` folders of `per_class` PNGs of `pixels` px: one colour per class, with noise (written once)."""
    from PIL import Image

    if (root / ".complete").exists():
        return
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            pixels_ = np.clip(base + rng.integers(-40, 40, (pixels, pixels, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels_).save(folder / f"{i}.png", compress_level=1)
    (root / ".complete").write_text("")


def spec_for(args: argparse.Namespace, root: Path):
    from services.spec import JobSpec

    large = args.classes_one > args.full_solve
    method = {"name": "linear", **({"max_iter": args.large_max_iter} if large else {})}
    return JobSpec.model_validate(
        {
            "dataset": {"path": str(root)},
            "backbone": {"name": BACKBONE, "pretrained": False, "image_size": args.image_size},
            "method": method,
            "extraction": {"batch_size": 256},
            **({"training": {"weight_decay": 1e-3}} if large else {}),
        }
    )


# ---------------------------------------------------------------------------------------------- child processes


def extract_child(args: argparse.Namespace) -> dict[str, Any]:
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter

    root = Path(args.work) / "datasets" / f"c{args.classes_one}"
    settings = common.make_settings(Path(args.work) / "data", Path(args.work), "cpu")
    spec = spec_for(args, root)
    with common.PeakRSS() as peak:
        t0 = time.perf_counter()
        out = run_extraction(spec, settings, NullReporter())
        seconds = time.perf_counter() - t0
    return {"cache_key": out["cache_key"], "seconds": seconds, "peak_mb": peak.peak / common.MB}


def train_child(args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image

    from services.jobs.pipeline import model_files
    from services.jobs.progress import NullReporter
    from services.training.job import train_job
    from storage.artifacts import ArtifactStore

    class Stages(NullReporter):
        """Ends a stage at each event of train_job that closes one: its seconds and peak RSS."""

        def __init__(self, peak: common.PeakRSS) -> None:
            super().__init__()
            self.peak, self.t, self.rows = peak, time.perf_counter(), {}

        def event(self, message: str, level: str = "info", type: str = "message", data: dict | None = None) -> None:
            super().event(message, level, type, data)
            name = next((stage for prefix, stage in ENDS.items() if message.startswith(prefix)), None)
            if name:
                self.end(name)

        def end(self, name: str) -> None:
            now = time.perf_counter()
            self.rows[name] = {"seconds": now - self.t, "peak_mb": self.peak.mark() / common.MB}
            self.t = now

    work = Path(args.work)
    settings = common.make_settings(work / "data", work, "cpu")
    spec = spec_for(args, work / "datasets" / f"c{args.classes_one}")
    peak = common.PeakRSS().start()
    stages = Stages(peak)
    out = train_job(spec, settings, args.cache_key, stages, work / "ckpt" / str(args.classes_one))
    stages.end("plot")  # what follows the evaluation in train_job: the metrics, the config and the plots
    files = model_files(out)
    ArtifactStore.from_settings(settings).save_model(
        f"model_c{args.classes_one}", out["weights"], out["manifest"], out["metrics"], files
    )
    stages.end("save")
    peak.stop()
    m = out["metrics"]
    features = (m["train_images"] + m["val_images"]) * out["manifest"].features.dim * 4
    weights = sum(np.asarray(v).nbytes for v in out["weights"].values())
    return {
        "stages": stages.rows,
        "baseline_mb": peak.baseline / common.MB,
        "peak_mb": max(r["peak_mb"] for r in stages.rows.values()),
        "model_mb": (features + weights) / common.MB,
        "evaluation_bytes": len(files["evaluation.json"]),
        "confusion_px": list(Image.open(io.BytesIO(files["plots/confusion.png"])).size),
        "val_accuracy": m["val_accuracy"],
        "weight_decay": m["weight_decay"],
        "iterations": m["iterations"],
        "images": m["train_images"] + m["val_images"],
    }


# ----------------------------------------------------------------------------------------------------- parent


def run_one(args: argparse.Namespace, classes: int) -> dict[str, Any]:
    work = Path(args.work)
    root = work / "datasets" / f"c{classes}"
    t0 = time.perf_counter()
    write_folder(root, classes, args.per_class, args.pixels)
    row: dict[str, Any] = {"classes": classes, "write_s": time.perf_counter() - t0}
    common.say(f"{classes} classes: written in {row['write_s']:.1f}s; extracting")
    argv = [
        "--work",
        str(work),
        "--classes-one",
        str(classes),
        *common.flags(args, ["image_size", "full_solve", "large_max_iter"]),
    ]
    ext = common.run_child(__file__, ["--child", "extract", *argv], env=common.MEMORY_ENV)
    if "error" in ext:
        return row | {"error": "extraction: " + "\n".join(ext["log"])}
    common.say(f"{classes} classes: extracted in {ext['seconds']:.1f}s; training")
    train = common.run_child(
        __file__, ["--child", "train", "--cache-key", ext["cache_key"], *argv], env=common.MEMORY_ENV
    )
    if "error" in train:
        return row | {"error": "training: " + "\n".join(train["log"])}
    return row | {"extract": ext, "train": train}


def report(rows: list[dict[str, Any]], args: argparse.Namespace, load: float) -> None:
    print(
        f"bench/classes.py: linear probe, {BACKBONE} (random init) at {args.image_size} px, {args.per_class} "
        f"images a class of {args.pixels} px; in-process pipeline (extraction and training each in a child "
        f"process, as the workers run them), CPU; above {args.full_solve} classes one L2 strength (1e-3), "
        f"L-BFGS max_iter {args.large_max_iter}"
    )
    ok = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            print(f"{r['classes']} classes failed: {r['error']}")
    seconds = [
        [
            f"{r['classes']:,}",
            f"{r['train']['images']:,}",
            common.fmt(r["write_s"]),
            common.fmt(r["extract"]["seconds"]),
            *(common.fmt(r["train"]["stages"][s]["seconds"]) for s in STAGES),
            f"{r['train']['weight_decay']:g}",
            str(r["train"]["iterations"]),
            common.fmt(r["train"]["val_accuracy"], 3),
        ]
        for r in ok
    ]
    print()
    print("seconds per stage")
    print(common.render(["classes", "images", "write", "extract", *STAGES, "l2", "iters", "val_acc"], seconds))
    memory = [
        [
            f"{r['classes']:,}",
            common.fmt(r["extract"]["peak_mb"], 0),
            common.fmt(r["train"]["baseline_mb"], 0),
            *(common.fmt(r["train"]["stages"][s]["peak_mb"], 0) for s in STAGES),
            common.fmt(r["train"]["peak_mb"], 0),
            common.fmt(r["train"]["model_mb"], 1),
            common.fmt(ratio(r), 1),
            f"{r['train']['evaluation_bytes'] / 1024:,.0f}",
            "x".join(map(str, r["train"]["confusion_px"])),
        ]
        for r in ok
    ]
    print()
    print("peak RSS (MB): the extraction process; the training process after imports (baseline), per stage and overall")
    print(
        common.render(
            [
                "classes",
                "extract",
                "baseline",
                *STAGES,
                "train peak",
                "features+weights",
                "ratio",
                "evaluation.json KB",
                "confusion px",
            ],
            memory,
        )
    )
    print()
    print(common.machine_line(load))
    kv: dict[str, str] = {}
    for r in ok:
        c = r["classes"]
        common.put(kv, f"peak_rss_mb_{c}", r["train"]["peak_mb"], 0)
        common.put(kv, f"extract_peak_rss_mb_{c}", r["extract"]["peak_mb"], 0)
        common.put(kv, f"rss_ratio_{c}", ratio(r), 2)
        common.put(
            kv, f"seconds_{c}", r["extract"]["seconds"] + sum(s["seconds"] for s in r["train"]["stages"].values()), 1
        )
        common.put(kv, f"evaluation_kb_{c}", r["train"]["evaluation_bytes"] / 1024, 0)
        kv[f"confusion_px_{c}"] = "x".join(map(str, r["train"]["confusion_px"]))
    kv["failed"] = str(len(rows) - len(ok))
    common.print_kv(kv)


def ratio(r: dict[str, Any]) -> float | None:
    """The train process's peak above its baseline over the bytes of its features and classifier."""
    t = r["train"]
    return common.ratio(t["peak_mb"] - t["baseline_mb"], t["model_mb"])


# --smoke: 120 classes (above reports.LARGE_CLASSES: the sparse report and the summary plot), one L2 strength and 3
# L-BFGS iterations
SMOKE = {"classes": "120", "full_solve": 0, "large_max_iter": 3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--classes", default="1000,21843", help="comma-separated class counts (default 1000,21843)")
    p.add_argument("--per-class", type=int, default=2, help="images a class (default 2: one trains, one validates)")
    p.add_argument("--pixels", type=int, default=16, help="side of the written images (default 16)")
    p.add_argument("--image-size", type=int, default=32, help="backbone input size (default 32: 4 patch tokens)")
    p.add_argument(
        "--full-solve",
        type=int,
        default=1000,
        help="up to this many classes the probe is the default job (default 1000)",
    )
    p.add_argument("--large-max-iter", type=int, default=10, help="L-BFGS iterations above --full-solve (default 10)")
    p.add_argument("--data-dir", help="working dir: datasets, cache, models (default: a temporary dir, removed after)")
    p.add_argument("--child", choices=("extract", "train"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--classes-one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cache-key", help=argparse.SUPPRESS)
    args = common.parse_with_smoke(p, argv, SMOKE)
    if args.child:
        common.child_result((extract_child if args.child == "extract" else train_child)(args))
        return 0
    load = common.load_average()
    with common.workdir(args.data_dir, "sidetune-bench-classes-") as work:
        args.work = str(work)
        rows = [run_one(args, int(c)) for c in args.classes.split(",")]
    report(rows, args, load)
    print(json.dumps(rows), file=sys.stderr)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
