"""`sidetune cache list|delete`: the feature cache, for operators (SIDETUNE_API_KEY must be an admin key)."""

from __future__ import annotations

import argparse

from worker.commands.common import Subparsers, client, print_json, resource, table, verb


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:.1f} MB"


def list_cache(args: argparse.Namespace) -> int:
    listing = client(args).cache()
    if args.json:
        print_json(listing)
        return 0
    title = f"{len(listing['data'])} entries, {_mb(listing['bytes'])}"
    if listing.get("quota_bytes") is not None:
        title += f" of a {_mb(listing['quota_bytes'])} quota"
    if listing.get("free_disk_bytes") is not None:
        title += f"; {_mb(listing['free_disk_bytes'])} free on its disk"
    table(
        ("key", "size", "complete", "in use by"),
        (
            (
                e["key"],
                _mb(e["bytes"]),
                "yes" if e["complete"] else "no",
                ", ".join(e["pinned_by"] + ([e["extracting"]] if e["extracting"] else [])),
            )
            for e in listing["data"]
        ),
        title=title,
    )
    return 0


def delete_entry(args: argparse.Namespace) -> int:
    client(args).delete_cache_entry(args.key)
    print(f"deleted cache entry {args.key}")
    return 0


def add_parsers(sub: Subparsers) -> None:
    cache = resource(
        sub,
        "cache",
        "list and delete feature cache entries (operators: an admin key)",
        [
            "sidetune cache",
            "sidetune cache delete 3f2a.../9c1b...",
        ],
        list_cache,
    )
    verb(
        cache,
        "list",
        "every entry, least recently used first: size, complete, the jobs using it",
        "sidetune cache list --json",
        list_cache,
    )
    p = verb(
        cache,
        "delete",
        "delete an entry (refused while a job reads or writes it)",
        "sidetune cache delete 3f2a.../9c1b...",
        delete_entry,
        reads=False,
    )
    p.add_argument("key", help="the entry's key, <family>/<variant>, as `sidetune cache` lists it")
