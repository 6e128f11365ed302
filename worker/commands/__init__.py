"""The CLI's verbs that talk to the API, one module per resource as the API's routes are (submit.py, jobs.py,
models.py: models, predict and report, datasets.py, cache.py), in the habits of gh and kubectl: `sidetune RESOURCE
VERB ...`, a table for people, `--json` for scripts on every verb that reads, an example in every `--help`.

The API's URL: `--url`, else SIDETUNE_URL (SIDETUNE_API_URL also read), else the configured host and port; the key:
SIDETUNE_API_KEY. Errors: the API's own message on stderr (worker/cli.py maps them to exit codes).
"""

from __future__ import annotations

from worker.commands import cache, datasets, jobs, models, submit
from worker.commands.common import Subparsers


def add_parsers(sub: Subparsers) -> None:
    for module in (submit, jobs, models, datasets, cache):
        module.add_parsers(sub)
