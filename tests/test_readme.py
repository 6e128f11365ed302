"""The README shows every route of the API's OpenAPI document and every CLI command once (with an example)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.worker.test_cli import COMMANDS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_the_readme_names_every_route(tmp_path) -> None:
    from api.main import create_app
    from storage.settings import Settings

    paths = create_app(Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1")).openapi()["paths"]
    missing = [p for p in paths if re.sub(r"\{\w*_id\}", "{id}", p) not in README]
    assert missing == []


def test_the_readme_shows_every_cli_command() -> None:
    missing = [c for c in COMMANDS if f"sidetune {' '.join(c)}" not in README]
    assert missing == []
