"""`sidetune datasets upload|list|get|delete`."""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.commands.common import Subparsers, client, details, print_json, resource, table, verb

DATASET_FIELDS = ("id", "name", "format", "num_images", "classes", "size_bytes", "created_at")


def upload(args: argparse.Namespace) -> int:
    dataset = client(args).upload(Path(args.archive), name=args.name)
    if args.json:
        print_json(dataset)
    else:
        print(
            f"uploaded {dataset['id']}: {dataset['num_images']} images, {len(dataset['classes'])} classes; a job "
            f'names it as "dataset": {{"id": "{dataset["id"]}"}}'
        )
    return 0


def list_datasets(args: argparse.Namespace) -> int:
    datasets = client(args).datasets(limit=args.limit)
    if args.json:
        print_json(datasets)
        return 0
    table(
        ("id", "name", "format", "images", "classes", "bytes"),
        ((d["id"], d.get("name"), d["format"], d["num_images"], len(d["classes"]), d["size_bytes"]) for d in datasets),
    )
    return 0


def get_dataset(args: argparse.Namespace) -> int:
    dataset = client(args).dataset(args.dataset_id)
    print_json(dataset) if args.json else details(dataset, DATASET_FIELDS)
    return 0


def delete_dataset(args: argparse.Namespace) -> int:
    client(args).delete_dataset(args.dataset_id)
    print(f"deleted {args.dataset_id}")
    return 0


def add_parsers(sub: Subparsers) -> None:
    datasets = resource(
        sub,
        "datasets",
        "upload, list, read and delete datasets",
        [
            "sidetune datasets upload flowers.zip",
            "sidetune datasets",
            "sidetune datasets delete ds_0194...",
        ],
        list_datasets,
        limit=100,
    )
    p = verb(
        datasets,
        "upload",
        "upload a zip or tar of an ImageFolder (one folder per class) or a CSV manifest",
        "sidetune datasets upload flowers.zip --name flowers",
        upload,
    )
    p.add_argument("archive", help="a .zip, .tar, .tar.gz/.tgz archive")
    p.add_argument("--name", help="a label for the dataset (default: the file name)")
    p = verb(
        datasets,
        "list",
        "the datasets, newest first (`sidetune datasets` alone does this)",
        "sidetune datasets list --json",
        list_datasets,
    )
    p.add_argument("--limit", type=int, default=100, help="most datasets (default 100)")
    p = verb(
        datasets, "get", "one dataset: format, image count, classes", "sidetune datasets get ds_0194...", get_dataset
    )
    p.add_argument("dataset_id")
    p = verb(
        datasets,
        "delete",
        "delete a dataset (refused while a queued or running job uses it)",
        "sidetune datasets delete ds_0194...",
        delete_dataset,
        reads=False,
    )
    p.add_argument("dataset_id")
