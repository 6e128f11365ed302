"""What travels with an export: the README's export snippets, run as written (parsed out of README.md, the export
files named as the snippets name them, `paths` the images) against a model trained at 64 px, not test_vit's own 160,
each giving predict's probabilities; and the model card every export carries (services/export/card.py), its front
matter parsed by `huggingface_hub.ModelCard`, its `model-index` the model's evaluation figures, its loading code run as
written in a fresh Python in the unpacked export (tests/cards.py), the placeholder line given the images, giving
predict's probabilities in every format. The figures (max abs differences of probabilities) are written to
test-artifacts/export_docs.json."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from huggingface_hub import ModelCard

from services.export import FORMATS, Exported
from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from services.jobs.train import model_files
from services.serving.inference import Predictor
from services.training.job import train_job
from storage.artifacts import ArtifactStore
from storage.settings import Settings
from tests.cards import blocks, exporter, start, unpack
from tests.helpers import job_spec

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
LINEAR = {"name": "linear", "solver": "sgd"}  # merges into timm's head, so every format takes it
# a test split (the card reports it), and none (the card reports the validation split's figures, named as such)
MODELS = {"model_test64": 0.25, "model_val64": 0.0}


def export_snippets() -> list[str]:
    """The python blocks of the README's Export section, dedented (they sit in list items)."""
    section = README.split("\n### Export\n", 1)[1].split("\n### ", 1)[0]
    return [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", section, flags=re.S)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_url: str, digits_root: Path) -> Settings:
    """A store with MODELS, linear probes at 64 px trained and saved as the train step saves them (evaluation.json
    and plots beside the weights)."""
    data = tmp_path_factory.mktemp("export-docs")
    settings = Settings(data_dir=data, redis_url=redis_url, allowed_roots=[data, digits_root.parent], device="cpu")
    artifacts = ArtifactStore.from_settings(settings)
    for model_id, test_fraction in MODELS.items():
        spec = job_spec(digits_root / "train", LINEAR, "cache", image_size=64)
        spec = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"test_fraction": test_fraction})})
        key = run_extraction(spec, settings, NullReporter())["cache_key"]
        out = train_job(spec, settings, key, NullReporter(), data / "ckpt" / model_id)
        artifacts.save_model(model_id, out["weights"], out["manifest"], out["metrics"], model_files(out))
    return settings


@pytest.fixture(scope="module")
def paths(images: list[bytes], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("export-docs-images")
    for i, data in enumerate(images):
        (folder / f"{i:02d}.png").write_bytes(data)
    return [str(p) for p in sorted(folder.glob("*.png"))]


@pytest.fixture(scope="module")
def figures(test_artifacts: Path):
    found: dict[str, float] = {}
    yield found
    (test_artifacts / "export_docs.json").write_text(json.dumps(found, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def exported(served: Settings, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Exported]:
    return exporter(served, tmp_path_factory)


def _predicted(settings: Settings, model_id: str, paths: list[str]) -> np.ndarray:
    predictor = Predictor(settings)
    classes = predictor.load(model_id).classes
    answers = predictor.predict(model_id, [Path(p).read_bytes() for p in paths])
    return np.array([[a["scores"][c] for c in classes] for a in answers])


def test_the_readme_export_snippets_give_predicts_probabilities(
    served, exported, paths, figures, tmp_path, monkeypatch
) -> None:
    timm_local, timm_by_name, onnx_block, adapter_block, mlflow_block = export_snippets()
    assert '"model_...-timm"' in timm_local and "img_size=" in timm_by_name
    model_id = "model_test64"
    work = tmp_path / "work"
    work.mkdir()
    with zipfile.ZipFile(exported(model_id, "timm").path) as z:
        z.extractall(work / "model_...-timm")  # the names the snippets use, in the folder they run in
    shutil.copy(exported(model_id, "onnx").path, work / "model_....onnx")
    shutil.copy(exported(model_id, "adapter").path, work / "model_...-adapter.zip")
    with zipfile.ZipFile(exported(model_id, "mlflow").path) as z:
        z.extractall(work / "model_...-mlflow")
    monkeypatch.chdir(work)
    expected = _predicted(served, model_id, paths)  # rounded to 6 decimals

    def run(code: str, namespace: dict) -> np.ndarray:
        exec(compile(code, "README.md", "exec"), namespace)
        return np.asarray(namespace["probs"], dtype=np.float64)

    timm_ns: dict = {"paths": paths}
    got = {
        "timm_local_dir": run(timm_local, timm_ns),
        "onnx": run(onnx_block, {"paths": paths}),
        "adapter": run(adapter_block, {"paths": paths}),
        "mlflow": run(mlflow_block, {"paths": paths}),
    }
    # the by-name block reloads `model` in the first block's namespace; the first block's last lines score it
    scoring = timm_local[timm_local.index("with torch.inference_mode():") :]
    got["timm_by_name"] = run(f"{timm_by_name}\n{scoring}", timm_ns)
    for route, probs in got.items():
        diff = float(np.abs(probs - expected).max())
        figures[f"readme_{route}_vs_predict_probs"] = diff
        assert diff <= 1e-5, (route, diff)


def _cards(exported: Callable[[str, str], Exported], model_id: str) -> dict[str, str]:
    """Each format's card: README.md in the zips, the ONNX graph's `model_card` metadata."""
    cards = {}
    for fmt in ("timm", "adapter", "mlflow", "hf"):
        with zipfile.ZipFile(exported(model_id, fmt).path) as z:
            cards[fmt] = z.read("README.md").decode()
    meta = {p.key: p.value for p in onnx.load(str(exported(model_id, "onnx").path)).metadata_props}
    cards["onnx"] = meta["model_card"]
    return cards


@pytest.mark.parametrize("model_id", MODELS)
def test_every_export_carries_a_model_card(model_id, served, exported) -> None:
    artifacts = ArtifactStore.from_settings(served)
    report = artifacts.read_json(model_id, "evaluation.json")
    metrics = artifacts.read_json(model_id, "metrics.json")
    manifest = json.loads(artifacts.read_file(model_id, "config.json"))
    split = report["split"]
    assert split == ("test" if MODELS[model_id] else "val")
    libraries = {"timm": "timm", "onnx": "onnx", "adapter": "sidetune", "mlflow": "mlflow", "hf": "timm"}
    for fmt, text in _cards(exported, model_id).items():
        card = ModelCard(text)  # huggingface_hub's own parser: front matter and model-index
        data = card.data
        assert data.library_name == libraries[fmt] and {"sidetune", "linear", "test_vit"} <= set(data.tags)
        assert len(data.datasets) == 1 and data.model_name == model_id
        results = {r.metric_type: r for r in data.eval_results}
        want = {k.removeprefix(f"{split}_"): v for k, v in report["metrics"].items()}
        assert {k: r.metric_value for k, r in results.items()} == want and "accuracy" in want
        assert set(data.metrics) == set(want)
        for r in results.values():
            assert r.dataset_split == ("test" if split == "test" else "validation")
            assert ("no test split" in r.metric_name) == (split == "val")
        body = card.text
        assert manifest["weights_hash"] in body and f"{metrics['trainable_params']:,} trainable parameters" in body
        assert all(f"`{c}`" in body for c in manifest["classes"]) and "Intended use and limits" in body
        assert "```python" in body.split("## How to load it", 1)[1]
    # the merged ViT's card loads it at the size it was trained at
    assert "img_size=64" in _cards(exported, model_id)["timm"]


def test_every_exports_card_code_runs_as_written(exported, served, paths, figures, tmp_path) -> None:
    """Each format's card's code, run as written in a fresh Python in the unpacked export, its placeholder line given
    the images, gives predict's probabilities; the `timm` card's second block, the model by name, too, in place of
    the first block's `model = ...` line as its card says. The formats' runs at once: each is mostly imports."""
    model_id = "model_test64"
    runs = {}
    for fmt in FORMATS:
        code, *more = blocks(unpack(exported(model_id, fmt), folder := tmp_path / fmt))
        runs[fmt] = start(code, folder, paths)
        if fmt == "timm":
            (by_name,) = more
            line = re.search(r"^model = timm\.create_model\(.*\n", code, flags=re.M).group(0)
            runs["timm_by_name"] = start(code.replace(line, by_name), folder, paths)
    expected = _predicted(served, model_id, paths)  # rounded to 6 decimals
    for route, run in runs.items():
        diff = float(np.abs(run.result() - expected).max())
        figures[f"card_{route}_vs_predict_probs"] = diff
        assert diff <= 1e-5, (route, diff)


def test_every_method_has_its_paper_on_the_card() -> None:
    from services.export.card import PAPERS
    from services.methods import CONFIGS

    assert set(CONFIGS) <= set(PAPERS)
