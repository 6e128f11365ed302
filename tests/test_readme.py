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


def _datasets_section() -> str:
    return README.split("### Datasets: where they live", 1)[1].split("\n### ", 1)[0]


def test_the_dataset_examples_are_valid_specs() -> None:
    """Each `sidetune submit` line of the README's dataset section builds, offline, a spec the server's model accepts
    (worker/commands/submit.py, services/spec/), and so does each `dataset` of its JSON block: the Hub id included,
    which only a server reaching the Hub can then read."""
    import json
    import shlex

    from services.spec import JobSpec
    from worker.cli import _parser
    from worker.commands.submit import build_spec

    section = _datasets_section()
    lines = [line for line in section.splitlines() if line.startswith("sidetune submit --dataset ")]
    assert len(lines) >= 13
    kinds = set()
    for line in lines:
        spec = JobSpec.model_validate(build_spec(_parser().parse_args(shlex.split(line)[1:])))
        kinds.add((spec.dataset.format, (spec.dataset.path or spec.dataset.id).split(":", 1)[0]))
    assert ("webdataset", "/data/shards/{000000..000009}.tar") in kinds and ("auto", "hf") in kinds
    block = section.split("```json\n", 1)[1].split("```", 1)[0]
    datasets = [json.loads(line) for line in block.splitlines()]
    assert len(datasets) == 13
    for dataset in datasets:
        JobSpec.model_validate(
            {"dataset": dataset, "backbone": {"name": "vit_base_patch16_224"}, "method": {"name": "auto"}}
        )
