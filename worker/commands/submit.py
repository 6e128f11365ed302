"""`sidetune submit`: a job spec from a JSON file, from options, or both (the options win), sent to the API; with
`--wait`, followed to its end.

The dataset options say where the data lives the way people write it: a server path, an upload's `ds_...` id, a
Hugging Face Hub id (`hf://org/name`), WebDataset shards (`wds://` before a server path or a URL forces the format;
a pattern ending in `.tar` needs no prefix), or an object-store URL of shards or of a CSV/JSONL manifest
(`s3://bucket/...`). What they name is checked by the server, as for a spec file: the CLI only builds the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from worker.api_spec import DatasetBody, HuggingFaceBody, JobSpecBody, WebDatasetBody
from worker.commands.common import Subparsers, UsageError, client, print_json, verb

WDS = "wds://"
FORMATS = ("auto", "imagefolder", "csv", "jsonl", "webdataset", "huggingface")


def dataset_location(location: str) -> DatasetBody:
    """`dataset` fields for `--dataset`: an upload id, or a path or URL with the format a `wds://` prefix names."""
    # a new location is read by `auto` unless told otherwise: a format in the spec file was for its location
    if location.startswith("ds_"):
        return {"id": location, "path": None, "format": None}
    if location.startswith(WDS):
        rest = location[len(WDS) :]
        if not (rest.startswith("/") or "://" in rest):
            raise UsageError(
                f"{location!r}: `wds://` takes a server path (wds:///data/shards/{{000000..000009}}.tar) or a URL "
                "(wds://s3://bucket/shards/{000000..000009}.tar)"
            )
        return {"path": rest, "id": None, "format": "webdataset"}
    return {"path": location, "id": None, "format": None}


def _webdataset(args: argparse.Namespace) -> WebDatasetBody:
    body: WebDatasetBody = {}
    if args.media_key:
        body["media_keys"] = args.media_key
    if args.label_key:
        body["label_key"] = args.label_key
    if args.label_field:
        body["label_field"] = args.label_field
    if args.classes:
        body["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    return body


def _huggingface(args: argparse.Namespace) -> HuggingFaceBody:
    body: HuggingFaceBody = {}
    if args.image_column:
        body["image_column"] = args.image_column
    if args.label_column:
        body["label_column"] = args.label_column
    if args.hf_splits:
        body["splits"] = args.hf_splits
    if args.hf_revision:
        body["revision"] = args.hf_revision
    if args.hf_config:
        body["config"] = args.hf_config
    return body


def _dataset(args: argparse.Namespace, dataset: DatasetBody) -> DatasetBody:
    """The spec's dataset with the dataset options applied."""
    out: DatasetBody = {**dataset}
    if args.dataset:
        out.update(dataset_location(args.dataset))
    if args.format:
        out["format"] = args.format
    if args.test:
        out.update({"test_id": args.test, "test": None} if args.test.startswith("ds_") else {"test": args.test})
    if args.multi_label:
        out["multi_label"] = True
    if webdataset := _webdataset(args):
        out["webdataset"] = {**(out.get("webdataset") or {}), **webdataset}
    if huggingface := _huggingface(args):
        out["huggingface"] = {**(out.get("huggingface") or {}), **huggingface}
    return {k: v for k, v in out.items() if v is not None}  # type: ignore[return-value]


def build_spec(args: argparse.Namespace) -> JobSpecBody:
    """The job spec: the file's (if any), then every option given on top of it."""
    spec: dict[str, Any] = json.loads(Path(args.spec).read_text()) if args.spec else {}
    spec["dataset"] = _dataset(args, spec.get("dataset") or {})
    if args.backbone:
        spec["backbone"] = {**spec.get("backbone", {}), "name": args.backbone}
    if args.no_pretrained and spec.get("backbone"):
        spec["backbone"]["pretrained"] = False
    if args.method:
        spec["method"] = {"name": args.method}  # another method's settings would not apply
    if args.epochs is not None:
        spec["training"] = {**spec.get("training", {}), "epochs": args.epochs}
    if args.name:
        spec["name"] = args.name
    missing = [f"--{k}" for k in ("dataset", "backbone", "method") if not spec.get(k)]
    if missing:
        raise UsageError(f"missing {' and '.join(missing)}: give them, or a spec file holding them")
    return spec  # type: ignore[return-value]


def submit(args: argparse.Namespace) -> int:
    api = client(args)
    spec = build_spec(args)
    if args.dry_run:
        plan = api.plan(spec)
        if args.json:
            print_json(plan)
        else:
            print(plan.get("message") or json.dumps(plan, indent=2))
        return 0
    job = api.submit(spec)
    if not args.wait:
        print_json(job) if args.json else print(f"submitted {job['id']}")
        return 0
    if not args.json:
        from worker.progress_view import follow

        print(f"submitted {job['id']}")
        job = follow(api, [job["id"]])[0]
        print(json.dumps({k: job[k] for k in ("id", "status", "model_id", "error", "metrics")}, indent=2))
    else:
        job = api.wait(job["id"])
        print_json(job)
    return 0 if job["status"] == "succeeded" else 1


EXAMPLES = """sidetune submit spec.json --wait
  sidetune submit --dataset /data/flowers --backbone vit_base_patch16_224 --method losa --wait
  sidetune submit spec.json --dataset 's3://bucket/shards/{000000..000099}.tar' --label-key json
  sidetune submit --dataset hf://org/name --image-column img --label-column fine_label --backbone ... --method linear
  sidetune submit --dataset s3://bucket/train.jsonl --backbone vit_small_patch16_224 --method linear --dry-run"""


def add_parsers(sub: Subparsers) -> None:
    p = verb(
        sub,
        "submit",
        "submit a job spec (a JSON file, options, or both: the options win); with --wait, follow it to its end",
        EXAMPLES,
        submit,
    )
    p.add_argument("spec", nargs="?", help="the job spec, a JSON file (dataset, backbone, method, execution, training)")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends; exit code 1 unless it succeeded")
    p.add_argument("--dry-run", action="store_true", help="print the server's plan of the spec; create no job")
    p.add_argument("--name", help="the job's name")
    p.add_argument("--backbone", help="timm model name (backbone.name), e.g. vit_base_patch16_224")
    p.add_argument(
        "--no-pretrained", action="store_true", help="backbone.pretrained: false (random weights, e.g. for a test)"
    )
    p.add_argument("--method", help="method.name, e.g. linear, losa (its other settings: a spec file)")
    p.add_argument("--epochs", type=int, help="training.epochs")
    data = p.add_argument_group("dataset (every field is checked by the server; see the job spec's `dataset`)")
    data.add_argument(
        "--dataset",
        metavar="LOCATION",
        help="dataset.path, or dataset.id for an upload's ds_... id: a server path (ImageFolder, .csv, .jsonl, "
        "Hugging Face save_to_disk or Parquet), WebDataset shards ('/data/shards/{000000..000009}.tar'; "
        "'wds://PATH' or 'wds://s3://...' forces the format), a Hub id (hf://org/name), or an object-store URL of "
        "shards or of a CSV/JSONL manifest (s3://bucket/...; under SIDETUNE_ALLOWED_PREFIXES)",
    )
    data.add_argument("--format", choices=FORMATS, help="dataset.format (default: auto, from the location)")
    data.add_argument("--test", metavar="LOCATION", help="dataset.test, or dataset.test_id for a ds_... id")
    data.add_argument("--multi-label", action="store_true", help="dataset.multi_label")
    data.add_argument("--image-column", help="Hugging Face: huggingface.image_column (default: image)")
    data.add_argument("--label-column", help="Hugging Face: huggingface.label_column (default: label)")
    data.add_argument(
        "--hf-splits", choices=("dataset", "draw"), help="Hugging Face: huggingface.splits (default: dataset)"
    )
    data.add_argument(
        "--hf-revision", metavar="REV", help="a Hub id's branch, tag or commit: huggingface.revision (default: main)"
    )
    data.add_argument("--hf-config", metavar="NAME", help="a Hub id's configuration: huggingface.config")
    data.add_argument(
        "--media-key",
        action="append",
        metavar="EXT",
        help="WebDataset: webdataset.media_keys, in order of preference (repeatable; default: the image and video "
        "extensions)",
    )
    data.add_argument("--label-key", metavar="EXT", help="WebDataset: webdataset.label_key (default: cls)")
    data.add_argument("--label-field", help="WebDataset: webdataset.label_field, with --label-key json")
    data.add_argument("--classes", help="WebDataset: webdataset.classes, comma-separated, in the order of the indices")
