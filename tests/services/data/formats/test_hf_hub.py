"""A Hub id's options (services/spec/dataset.py: `huggingface.revision`, `huggingface.config`; formats/hf_load.py)
without the Hub, which this machine cannot reach: the spec takes them for `hf://` ids only; offline, the one-line
error names them; against a local HTTP server answering as the Hub does for a gated dataset (401, `X-Error-Code:
GatedRepo`), the `datasets` library asks for the revision given, and the error says whether the server has a token at
all, never showing it."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

pytest.importorskip("datasets")

from services.data.formats.base import HuggingFaceOptions  # noqa: E402
from services.spec import DatasetSpec  # noqa: E402
from tests.services.data.formats.test_huggingface import _run  # noqa: E402

READ = (
    "from services.data.formats.base import HuggingFaceOptions\n"
    "from services.data.formats.hf_load import load_hub\n"
    "from services.data.datasets import DatasetError\n"
    "try:\n"
    "    load_hub('hf://org/pets', HuggingFaceOptions(revision='v1.0', config='small'))\n"
    "except DatasetError as e:\n"
    "    print('ERROR', e)\n"
)


def test_revision_and_config_are_taken_for_hub_ids_only() -> None:
    spec = DatasetSpec(path="hf://org/pets", huggingface={"revision": "refs/convert/parquet", "config": "small"})
    assert (spec.huggingface.revision, spec.huggingface.config) == ("refs/convert/parquet", "small")
    assert DatasetSpec(path="/data/x.csv", test="hf://org/pets", huggingface={"revision": "a1b2c3"}).huggingface
    with pytest.raises(ValidationError, match=r"huggingface.revision applies to a Hub id \(`hf://org/name`\) only"):
        DatasetSpec(path="/data/pets-hf", huggingface={"revision": "main"})
    with pytest.raises(ValidationError, match="huggingface.config applies to a Hub id"):
        DatasetSpec(path="/data/pets-hf", format="huggingface", huggingface={"config": "small"})
    for bad in ({"revision": "-x"}, {"revision": "a b"}, {"config": "a/b"}, {"config": ""}):
        with pytest.raises(ValidationError):
            DatasetSpec(path="hf://org/pets", huggingface=bad)
    assert HuggingFaceOptions().revision is None and HuggingFaceOptions().config is None


def test_offline_the_one_line_error_names_the_revision_and_config(tmp_path: Path) -> None:
    out = _run(READ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("ERROR")]
    assert line.startswith("ERROR hf://org/pets: the Hugging Face Hub dataset 'org/pets' (config 'small', "), out
    assert "revision 'v1.0')" in line and "offline (HF_HUB_OFFLINE is set)" in line and "save_to_disk" in line


class _GatedHub(http.server.BaseHTTPRequestHandler):
    """Every request answered as the Hub answers one for a gated dataset the caller may not read."""

    asked: list[tuple[str, str | None]] = []

    def _gated(self) -> None:
        self.asked.append((self.path, self.headers.get("authorization")))
        self.send_response(401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to dataset org/pets is restricted. You must be authenticated.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _gated

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gated_hub() -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    _GatedHub.asked = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", _GatedHub.asked
    finally:
        server.shutdown()
        thread.join()


def test_a_gated_dataset_says_whether_the_server_has_a_token(
    gated_hub: tuple[str, list[tuple[str, str | None]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint, asked = gated_hub
    monkeypatch.delenv("HF_TOKEN", raising=False)  # _run passes the environment on; a saved login lives in HF_HOME
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    without = _run(READ, **env)
    assert "it is a gated dataset and the server has no Hugging Face token: set HF_TOKEN" in without.stdout, without
    assert any("/datasets/org/pets/resolve/v1.0/" in path for path, _ in asked)  # the revision asked of the Hub
    assert all(auth is None for _, auth in asked)

    asked.clear()
    secret = "hf_notARealTokenButSecret0123"
    with_token = _run(READ, **env, HF_TOKEN=secret)
    assert "it is a gated dataset and the server's token has no access to it" in with_token.stdout, with_token
    assert f"Bearer {secret}" in {auth for _, auth in asked}  # sent to the Hub, and nowhere else
    assert secret not in with_token.stdout + with_token.stderr
