"""`sidetune jobs list|get|cancel|delete|events|checkpoints|tensorboard` (`sidetune submit`: submit.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from worker.client import TERMINAL
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

JOB_FIELDS = (
    "id",
    "status",
    "created_at",
    "started_at",
    "finished_at",
    "model_id",
    "progress",
    "error",
    "metrics",
    "spec",
)


def list_jobs(args: argparse.Namespace) -> int:
    jobs = client(args).jobs(limit=args.limit, after=args.after)
    if args.json:
        print_json(jobs)
        return 0
    table(
        ("id", "status", "method", "backbone", "val acc/mAP", "test acc/mAP", "model", "created"),
        (
            (
                j["id"],
                j["status"],
                j["spec"]["method"]["name"],
                j["spec"]["backbone"]["name"],
                validation(j["metrics"]),
                held_out(j["metrics"]),
                j.get("model_id"),
                _time(j["created_at"]),
            )
            for j in jobs
        ),
    )
    return 0


def get_job(args: argparse.Namespace) -> int:
    job = client(args).job(args.job_id)
    print_json(job) if args.json else details(job, JOB_FIELDS)
    return 0


def cancel_job(args: argparse.Namespace) -> int:
    job = client(args).cancel(args.job_id)
    if args.json:
        print_json(job)
    else:
        print(f"{job['id']}: {job['status']}" + (" (stops at its next check)" if job["status"] not in TERMINAL else ""))
    return 0


def delete_job(args: argparse.Namespace) -> int:
    client(args).delete_job(args.job_id)
    print(f"deleted {args.job_id}")
    return 0


def events(args: argparse.Namespace) -> int:
    api = client(args)
    stream = api.follow_events(args.job_id, after=args.after) if args.follow else _pages(api, args.job_id, args.after)
    for event in stream:
        if args.json:
            print(json.dumps(event), flush=True)  # one JSON object per line
        else:
            print(
                f"{event['seq']:>4}  {_time(event['created_at'])}  {event['level']:<7}  {event['message']}", flush=True
            )
    return 0


def _pages(api, job_id: str, after: int):
    while True:
        page = api.event_page(job_id, after=after, limit=1000)
        yield from page["data"]
        if not page["has_more"]:
            return
        after = page["data"][-1]["seq"]


def checkpoints(args: argparse.Namespace) -> int:
    api = client(args)
    if args.download:
        path = api.checkpoint_file(args.job_id, args.download, Path(args.output or f"{args.job_id}-{args.download}"))
        print(f"wrote {path}")
        return 0
    listing = api.checkpoints(args.job_id)
    if args.json:
        print_json(listing)
        return 0
    table(
        ("file", "bytes", "epoch", "best epoch", "written"),
        ((c["name"], c["size_bytes"], c["epoch"], c["best_epoch"], _time(c["created_at"])) for c in listing["data"]),
    )
    if listing["expires_at"]:
        print(f"kept until {_time(listing['expires_at'])}")
    return 0


def tensorboard(args: argparse.Namespace) -> int:
    folder = client(args).tensorboard(args.job_id, Path(args.folder))
    print(f"wrote {folder}; view it with: tensorboard --logdir {folder}")
    return 0


def _time(t: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def add_parsers(sub: Subparsers) -> None:
    jobs = resource(
        sub,
        "jobs",
        "list, read, cancel, delete and follow jobs",
        [
            "sidetune jobs                                  # the latest 20",
            "sidetune jobs get job_0194... --json",
            "sidetune jobs events job_0194... --follow",
            "sidetune jobs cancel job_0194...",
        ],
        list_jobs,
        limit=20,
        after=None,
    )
    p = verb(
        jobs,
        "list",
        "the jobs, newest first (`sidetune jobs` alone does this)",
        "sidetune jobs list --limit 5",
        list_jobs,
    )
    p.add_argument("--limit", type=int, default=20, help="most jobs (default 20)")
    p.add_argument("--after", help="the last job id of the previous page")
    p = verb(jobs, "get", "one job: status, progress, metrics, error, spec", "sidetune jobs get job_0194...", get_job)
    p.add_argument("job_id")
    p = verb(
        jobs,
        "cancel",
        "cancel a job (planning or queued: at once; running: at its next check)",
        "sidetune jobs cancel job_0194...",
        cancel_job,
    )
    p.add_argument("job_id")
    p = verb(
        jobs,
        "delete",
        "delete a finished job, its events and checkpoint (its model stays)",
        "sidetune jobs delete job_0194...",
        delete_job,
        reads=False,
    )
    p.add_argument("job_id")
    p = verb(
        jobs,
        "events",
        "a job's events (progress messages, per-epoch metrics); --follow until it ends",
        "sidetune jobs events job_0194... --follow",
        events,
    )
    p.add_argument("job_id")
    p.add_argument("--after", type=int, default=0, help="events after this sequence number")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events until the job has ended")
    p = verb(
        jobs,
        "checkpoints",
        "a job's checkpoint files (kept SIDETUNE_CHECKPOINT_RETENTION_H after it ends)",
        "sidetune jobs checkpoints job_0194... --download checkpoint.safetensors",
        checkpoints,
    )
    p.add_argument("job_id")
    p.add_argument("--download", metavar="NAME", help="download this file instead of listing")
    p.add_argument("--output", "-o", help="where to write the download (default: JOB_ID-NAME)")
    _add_tensorboard(jobs)


def _add_tensorboard(jobs: Subparsers) -> None:
    p = verb(
        jobs,
        "tensorboard",
        "a job's TensorBoard event files, extracted into a folder (a run per configuration)",
        "sidetune jobs tensorboard job_0194... runs/ && tensorboard --logdir runs/",
        tensorboard,
        reads=False,
    )
    p.add_argument("job_id")
    p.add_argument("folder", help="where to extract them (created if missing)")
