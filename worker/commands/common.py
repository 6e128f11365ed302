"""What the CLI's verbs share (worker/commands/): the API client, output as a table, details or JSON, and the parsers
of a resource and of a verb with their common options and examples."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from typing import Any

from storage.settings import Settings
from worker.api_types import Dataset, Job, Metrics, Model
from worker.client import Client, default_url

Subparsers = Any  # what ArgumentParser.add_subparsers returns (its class is private to argparse)

ENVIRONMENT = """environment:
  SIDETUNE_URL       the API's URL (default: http://SIDETUNE_API_HOST:SIDETUNE_API_PORT, 127.0.0.1:8000)
  SIDETUNE_API_KEY   the API key sent as `Authorization: Bearer <key>` (needed where SIDETUNE_API_KEYS is set)
  SIDETUNE_MLFLOW_TRACKING_URI  the MLflow tracking server `sidetune models register` registers in
  HF_TOKEN, HF_ENDPOINT  the token and the Hub `sidetune models push` uploads with (huggingface_hub's own)"""


class CommandError(RuntimeError):
    """What a verb itself finds wrong (not the API's answer), said as one line on stderr (worker/cli.py): a setting
    missing or a package not installed (exit 2), or, `unreachable`, a service other than the API not answering (exit
    3)."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class UsageError(CommandError):
    """Options that do not make a request (worker/cli.py: exit code 2, one line)."""


def client(args: argparse.Namespace) -> Client:
    settings = Settings()
    return Client(args.url or default_url() or f"http://{settings.api_host}:{settings.api_port}")


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def table(columns: Iterable[str], rows: Iterable[Iterable[Any]], title: str | None = None) -> None:
    from rich.table import Table

    from worker.progress_view import console

    t = Table(*columns, title=title)
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    console().print(t)


def details(record: Job | Model | Dataset, fields: Iterable[str]) -> None:
    """One record as `field  value` lines (nested values as compact JSON)."""
    for field in fields:
        value = record.get(field)
        if value not in (None, "", [], {}):
            shown = value if isinstance(value, str | int | float) else json.dumps(value, separators=(",", ":"))
            print(f"{field:<14}{shown}")


def number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else ""


def validation(metrics: Metrics) -> str:
    """The validation figure: accuracy, or mAP for a multi-label model."""
    return number(metrics.get("val_accuracy", metrics.get("val_map")))


def held_out(metrics: Metrics) -> str:
    """The held-out test split's accuracy (or mAP); empty without a test split."""
    return number(metrics.get("test_accuracy", metrics.get("test_map")))


def verb(
    parent: Subparsers,
    name: str,
    summary: str,
    example: str,
    func: Callable[[argparse.Namespace], int],
    reads: bool = True,
) -> argparse.ArgumentParser:
    """A command that talks to the API: `--url`, `--json` where it reads, and its example in `--help`."""
    p = parent.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=f"example:\n  {example}\n\n{ENVIRONMENT}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p, reads)
    p.set_defaults(func=func)
    return p


def _common(p: argparse.ArgumentParser, reads: bool = True) -> None:
    # SUPPRESS: an option left out adds nothing, so `sidetune jobs --url X list` keeps X (argparse copies a nested
    # parser's values over its parent's, defaults included); worker/cli.py sets the defaults once, at the top.
    p.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="the API's URL (default: SIDETUNE_URL, else the configured host and port)",
    )
    if reads:
        p.add_argument(
            "--json",
            action="store_true",
            default=argparse.SUPPRESS,
            help="print the API's JSON instead of text (a stream of events: one object per line)",
        )


def resource(
    sub: Subparsers,
    name: str,
    summary: str,
    examples: list[str],
    listing: Callable[[argparse.Namespace], int],
    **defaults: Any,
) -> Subparsers:
    """`sidetune NAME VERB ...`; `sidetune NAME` alone lists, as `sidetune NAME list` does (`defaults`: that verb's
    option defaults)."""
    lines = "\n".join(f"  {e}" for e in examples)
    p = sub.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=f"examples:\n{lines}\n\n{ENVIRONMENT}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.add_argument("--limit", type=int, default=argparse.SUPPRESS, help="with no VERB: list at most this many")
    p.set_defaults(func=listing, **defaults)
    return p.add_subparsers(dest="verb", metavar="VERB")
