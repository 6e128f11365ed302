"""`sidetune models list|get|delete|export|register|push` (register, push: registry.py), `sidetune predict` and
`sidetune report`."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from worker.api_types import Metrics, SweepEntry
from worker.commands import registry
from worker.commands.common import (
    Subparsers,
    client,
    details,
    held_out,
    print_json,
    resource,
    table,
    validation,
    verb,
)

MODEL_FIELDS = (
    "id",
    "job_id",
    "method",
    "mode",
    "backbone",
    "video",
    "classes",
    "multi_label",
    "threshold",
    "created_at",
    "evaluation",
    "plots",
    "metrics",
)


def list_models(args: argparse.Namespace) -> int:
    models = client(args).models(limit=args.limit)
    if args.json:
        print_json(models)
        return 0
    table(
        ("id", "method", "backbone", "classes", "val acc/mAP", "test acc/mAP", "job"),
        (
            (
                m["id"],
                m["method"],
                m["backbone"],
                len(m["classes"]),
                validation(m["metrics"]),
                held_out(m["metrics"]),
                m["job_id"],
            )
            for m in models
        ),
    )
    return 0


def get_model(args: argparse.Namespace) -> int:
    model = client(args).model(args.model_id)
    print_json(model) if args.json else details(model, MODEL_FIELDS)
    return 0


def delete_model(args: argparse.Namespace) -> int:
    client(args).delete_model(args.model_id)
    print(f"deleted {args.model_id}")
    return 0


def export(args: argparse.Namespace) -> int:
    path = client(args).export(args.model_id, args.format, Path(args.output) if args.output else None)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


def predict(args: argparse.Namespace) -> int:
    """One model: a line per file (file, label, score, tags). Several (`model_a,model_b`): one request for all of
    them, a line per file and model (file, model, label, score, tags); --json: {model: [{file, ...}]}."""
    model_ids = [m for m in args.model_id.split(",") if m]
    files = [Path(p) for p in args.files]
    if len(model_ids) == 1:
        answers = {model_ids[0]: client(args).predict(model_ids[0], files, threshold=args.threshold)}
    else:
        answers = client(args).predict_many(model_ids, files, threshold=args.threshold)
    if args.json:
        by_model = {m: [{"file": f, **p} for f, p in zip(args.files, ps, strict=True)] for m, ps in answers.items()}
        print_json(by_model if len(model_ids) > 1 else by_model[model_ids[0]])
        return 0
    for model_id, predictions in answers.items():
        for path, p in zip(args.files, predictions, strict=True):
            tags = f"\t{'|'.join(p['labels'])}" if p.get("labels") is not None else ""
            model = f"{model_id}\t" if len(model_ids) > 1 else ""
            print(f"{path}\t{model}{p['label']}\t{p['scores'][p['label']]:.4f}{tags}")
    return 0


REPORT_ROWS = 20  # per-class rows `sidetune report` prints for a model of more than 100 classes, without --all


def report(args: argparse.Namespace) -> int:
    """The model's evaluation as tables (scikit-learn's metrics, from the API) and its plots as PNG files. Up to 100
    classes every class is printed; above, the first REPORT_ROWS classes and the most frequent confusions, unless
    `--all` asks for every class."""
    api = client(args)
    model = api.model(args.model_id)
    evaluation = api.whole_evaluation(args.model_id) if args.all else api.evaluation(args.model_id)
    folder = Path(args.out or args.model_id)
    folder.mkdir(parents=True, exist_ok=True)
    plots = []
    for name in model.get("plots", []):
        plots.append(folder / f"{name}.png")
        plots[-1].write_bytes(api.plot(args.model_id, name))
    if args.json:
        print_json({"model": model, "evaluation": evaluation, "plots": [str(p) for p in plots]})
        return 0
    split = {"test": "the test split", "val": "the validation split (no test split: optimistic, it chose the model)"}
    print(
        f"{model['id']}: {model['method']} on {model['backbone']}, evaluated on {split[evaluation['split']]}, "
        f"{evaluation['images']} images"
    )
    if evaluation.get("threshold") is not None:
        print(f"tags predicted at scores >= {evaluation['threshold']:g} (the threshold chosen on validation)")
    figures = {k: v for k, v in model["metrics"].items() if k in ("val_accuracy", "val_map", "val_loss")}
    table(("metric", "value"), ((k, f"{v:.4f}") for k, v in {**figures, **evaluation["metrics"]}.items()))
    total = evaluation.get("total", len(evaluation["classes"]))
    whole = args.all or not evaluation.get("has_more")
    per = evaluation["per_class"] if whole else evaluation["per_class"][:REPORT_ROWS]
    ap = "average_precision" in per[0]
    table(
        ("class", "precision", "recall", "f1", "support", *(["AP"] if ap else [])),
        (
            (
                r["class"],
                f"{r['precision']:.3f}",
                f"{r['recall']:.3f}",
                f"{r['f1']:.3f}",
                r["support"],
                *([f"{r['average_precision'] or 0:.3f}"] if ap else []),
            )
            for r in per
        ),
        title=None if whole else f"the first {len(per)} of {total:,} classes (--all prints every class)",
    )
    if not model.get("multi_label") and total <= 30:
        table(
            ("true \\ predicted", *evaluation["classes"]),
            ((name, *row) for name, row in zip(evaluation["classes"], evaluation["confusion_matrix"], strict=True)),
            title="confusion matrix",
        )
    elif evaluation.get("top_confusions"):
        table(
            ("true class", "predicted as", "images"),
            ((c["true"], c["predicted"], c["count"]) for c in evaluation["top_confusions"]),
            title="most frequent confusions",
        )
    if model["metrics"].get("sweep"):
        title, columns, rows = sweep_table(model["metrics"], bool(model.get("multi_label")))
        table(columns, rows, title=title)
    for path in plots:
        print(f"wrote {path}")
    return 0


def sweep_table(metrics: Metrics, multi_label: bool) -> tuple[str, tuple[str, ...], list[tuple[str, ...]]]:
    """A job's sweep as (title, columns, rows), best first. The L-BFGS linear probe fits every configuration at each
    L2 strength of its grid: a row per fit, its L2 strength (`weight_decay`) beside the configuration."""
    metric = "val_map" if multi_label else "val_accuracy"
    sweep, n = metrics["sweep"], metrics["configurations"]
    chosen = (metrics.get("selected"), metrics.get("weight_decay"))

    def score(e: SweepEntry) -> float:
        return e["val_map"] if multi_label else e["val_accuracy"]

    rows = []
    for e in sorted(sweep, key=lambda e: -score(e) if score(e) == score(e) else math.inf):  # NaN (diverged) last
        setting = e["config"] | ({"weight_decay": e["weight_decay"]} if "weight_decay" in e else {})
        selected = (e["config"], e.get("weight_decay", chosen[1])) == chosen
        rows.append(
            (json.dumps(setting) + (" (selected)" if selected else ""), f"{score(e):.4f}", f"{e['val_loss']:.4f}")
        )
    title = f"sweep: {n} configurations" + (f", {len(sweep)} fits over L2 strengths" if len(sweep) != n else "")
    return title, ("configuration", metric, "val_loss"), rows


def add_parsers(sub: Subparsers) -> None:
    _model_parsers(sub)
    _result_parsers(sub)


def _model_parsers(sub: Subparsers) -> None:
    """`sidetune models list|get|delete|export|register|push`."""
    models = resource(
        sub,
        "models",
        "list, read, delete, export, register and push adapted models",
        [
            "sidetune models",
            "sidetune models get model_0194... --json",
            "sidetune models export model_0194... --format timm -o model-timm.zip",
        ],
        list_models,
        limit=100,
    )
    p = verb(
        models,
        "list",
        "the models, newest first (`sidetune models` alone does this)",
        "sidetune models list",
        list_models,
    )
    p.add_argument("--limit", type=int, default=100, help="most models (default 100)")
    p = verb(
        models,
        "get",
        "one model: method, backbone, classes, metrics, evaluation summary",
        "sidetune models get model_0194...",
        get_model,
    )
    p.add_argument("model_id")
    p = verb(
        models,
        "delete",
        "delete a model and its files (predict then answers 404)",
        "sidetune models delete model_0194...",
        delete_model,
        reads=False,
    )
    p.add_argument("model_id")
    p = verb(
        models,
        "export",
        "download a model as a timm checkpoint, an ONNX graph, an adapter, an MLflow model or a Hub folder",
        "sidetune models export model_0194... --format onnx -o model.onnx",
        export,
        reads=False,
    )
    p.add_argument("model_id")
    p.add_argument(
        "--format",
        required=True,
        choices=("timm", "onnx", "adapter", "mlflow", "hf"),
        help="timm: a plain timm checkpoint (APLA, ARC, LoRA, full, timm-headed linear probes); onnx: one "
        "graph, every method; adapter: the trained weights and their config, every method; mlflow: an MLflow "
        "pyfunc model running the ONNX graph, every method; hf: a Hugging Face Hub folder (timm's layout "
        "where timm takes the model, the adapter's otherwise; `sidetune models push` uploads it)",
    )
    p.add_argument("--output", "-o", help="the file to write (default: the server's name, e.g. MODEL_ID.onnx)")
    registry.add_parser(models)


def _result_parsers(sub: Subparsers) -> None:
    """`sidetune predict` and `sidetune report`: what a model answers and how it was evaluated."""
    p = verb(
        sub,
        "predict",
        "classify image (or video) files with a model, or with several at once (one request, one decode)",
        "sidetune predict model_0194... cat.png dog.jpg",
        predict,
    )
    p.add_argument("model_id", help="a model id, or several joined by commas: model_a,model_b")
    p.add_argument("files", nargs="+", help="image files, or video files for a model trained on clips")
    p.add_argument("--threshold", type=float, help="multi-label models: predict the tags scoring at least this")

    p = verb(
        sub,
        "report",
        "a model's evaluation as tables, and its plots as PNG files",
        "sidetune report model_0194... --out report/",
        report,
    )
    p.add_argument("model_id")
    p.add_argument("--out", help="folder for the plots (default: ./MODEL_ID)")
    p.add_argument(
        "--all",
        action="store_true",
        help=f"every class's row (default: every class up to 100, else the first {REPORT_ROWS})",
    )
