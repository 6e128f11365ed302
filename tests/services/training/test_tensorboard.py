"""A job's TensorBoard runs (services/training/tensorboard.py), read back by TensorBoard's own event reader: scalars per
epoch for each configuration of a sweep, the hyperparameters and the plots as images; the L-BFGS probe's L2 path; each
epoch once after a resume, even where a killed worker had copied events of an epoch its checkpoint did not keep;
tracking that fails leaves the job to succeed."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from services.extraction import run_extraction
from services.jobs.progress import Cancelled, NullReporter
from services.spec import JobSpec
from services.training.job import train_job
from services.training.tensorboard import EVENTS
from storage.settings import Settings
from storage.store import Store
from tests.services.training.test_sweeps import CancelAtEpoch

BACKBONE = {"name": "test_vit", "pretrained": False}
FIELDS = {"train/loss": "train_loss", "val/accuracy": "val_accuracy", "val/loss": "val_loss", "train/lr": "lr"}


def spec(path: Path, method: dict | None = None, sweep: dict | None = None, **training) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"path": str(path), "test_fraction": 0.2},
            "backbone": BACKBONE,
            "method": method or {"name": "losa", "rank": 4},
            "extraction": {"batch_size": 32},
            "training": {"epochs": 3, "batch_size": 32, "lr": 0.05, **training},  # not LoSA's automatic grid
            **({"sweep": sweep} if sweep is not None else {}),
        }
    )


@pytest.fixture(scope="module")
def cache(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, str]:
    data = tmp_path_factory.mktemp("tensorboard_cache")
    settings = Settings(data_dir=data, allowed_roots=[digits_root], device="cpu")
    return settings, run_extraction(spec(digits_root / "train"), settings, NullReporter())["cache_key"]


def read(run: Path) -> EventAccumulator:
    """A run as TensorBoard reads it (every event kept)."""
    assert (run / EVENTS).is_file(), sorted(p.name for p in run.parent.iterdir())
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def hparams(acc: EventAccumulator) -> dict[str, object]:
    """The run's session: its hyperparameters, as TensorBoard's hparams plugin reads them."""
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def check_curve(acc: EventAccumulator, history: list[dict]) -> None:
    for tag, field in FIELDS.items():
        assert scalars(acc, tag) == [(row["epoch"], pytest.approx(row[field], rel=1e-6)) for row in history], tag


@pytest.mark.parametrize("sweep", [None, {"lr": [0.01, 0.05]}], ids=["one-configuration", "sweep"])
def test_a_job_writes_its_curves_hyperparameters_and_plots(
    cache: tuple[Settings, str], digits_root: Path, tmp_path: Path, sweep: dict | None
) -> None:
    settings, key = cache
    job = spec(digits_root / "train", sweep=sweep)
    out = train_job(job, settings, key, NullReporter(), tmp_path / "ckpt", None, tmp_path / "tb")
    m = out["metrics"]
    root = read(tmp_path / "tb")
    assert sorted(root.Tags()["images"]) == ["plots/confusion", "plots/curves"]
    confusion = root.Images("plots/confusion")[0]
    assert confusion.width > 100 and confusion.height > 100 and confusion.encoded_image_string[:4] == b"\x89PNG"
    test = out["evaluation"]["metrics"]["test_accuracy"]
    assert scalars(root, "hparams/test_accuracy") == [(0, pytest.approx(test))]
    if sweep is None:
        check_curve(root, m["history"])
        assert hparams(root)["lr"] == pytest.approx(job.training.lr) and hparams(root)["method"] == "losa"
        assert scalars(root, "hparams/val_accuracy") == [(0, pytest.approx(m["val_accuracy"]))]
        return
    runs = sorted(p.name for p in (tmp_path / "tb").iterdir() if p.is_dir())
    assert runs == ["config_00-lr=0.01", "config_01-lr=0.05"]
    for name, entry in zip(runs, m["sweep"], strict=True):
        acc = read(tmp_path / "tb" / name)
        check_curve(acc, entry["history"])
        assert hparams(acc)["lr"] == pytest.approx(entry["config"]["lr"])
        assert scalars(acc, "hparams/val_accuracy") == [(0, pytest.approx(entry["val_accuracy"]))]
        assert "hparams/test_accuracy" not in acc.Tags()["scalars"]  # the selected model's, at the root
    assert hparams(root)["lr"] == pytest.approx(m["selected"]["lr"])


def test_the_linear_probes_l2_path(cache: tuple[Settings, str], digits_root: Path, tmp_path: Path) -> None:
    settings, key = cache
    job = spec(digits_root / "train", method={"name": "linear"})
    out = train_job(job, settings, key, NullReporter(), tmp_path / "ckpt", None, tmp_path / "tb")
    path = out["metrics"]["l2_path"]
    acc = read(tmp_path / "tb")
    assert scalars(acc, "l2/val_accuracy") == [(i, pytest.approx(p["val_accuracy"])) for i, p in enumerate(path)]
    assert [s for s, _ in scalars(acc, "l2/log10_weight_decay")] == list(range(len(path)))
    assert hparams(acc)["method"] == "linear" and "plots/confusion" in acc.Tags()["images"]


def test_a_resumed_job_has_each_epoch_once(cache: tuple[Settings, str], digits_root: Path, tmp_path: Path) -> None:
    """The job is cut after its first epoch's checkpoint; its TensorBoard folder holds what a killed worker could have
    copied (every epoch of a run that went further than its checkpoint). The resumed job's runs hold each epoch
    once, with its own figures."""
    settings, key = cache
    job = spec(digits_root / "train", sweep={"lr": [0.01, 0.05]})
    tb = tmp_path / "tb"
    train_job(job, settings, key, NullReporter(), tmp_path / "ahead", None, tb)  # three epochs copied
    with pytest.raises(Cancelled):
        train_job(job, settings, key, CancelAtEpoch(2), tmp_path / "cut")  # checkpointed after epoch 1
    reporter = NullReporter()
    resumed = train_job(job, settings, key, reporter, tmp_path / "cut", None, tb)
    assert any("resumed training from the checkpoint of epoch 1" in e["message"] for e in reporter.events)
    for j, entry in enumerate(resumed["metrics"]["sweep"]):
        acc = read(next(tb.glob(f"config_{j:02d}-*")))
        check_curve(acc, entry["history"])  # epochs 1, 2, 3: once each
        assert [s for s, _ in scalars(acc, "train/seconds")] == [1, 2, 3]


def test_a_cut_job_keeps_its_epochs_and_its_resume_adds_the_rest(
    cache: tuple[Settings, str], digits_root: Path, tmp_path: Path
) -> None:
    settings, key = cache
    job = spec(digits_root / "train")
    with pytest.raises(Cancelled):
        train_job(job, settings, key, CancelAtEpoch(3), tmp_path / "ckpt", None, tmp_path / "tb")
    assert [s for s, _ in scalars(read(tmp_path / "tb"), "train/loss")] == [1, 2]  # copied as the job ended
    out = train_job(job, settings, key, NullReporter(), tmp_path / "ckpt", None, tmp_path / "tb")
    check_curve(read(tmp_path / "tb"), out["metrics"]["history"])


def test_tracking_that_fails_never_fails_the_job(
    cache: tuple[Settings, str], digits_root: Path, tmp_path: Path
) -> None:
    settings, key = cache
    (tmp_path / "tb").write_text("a file where the folder should be")
    reporter = NullReporter()
    out = train_job(
        spec(digits_root / "train", epochs=2), settings, key, reporter, tmp_path / "ckpt", None, tmp_path / "tb"
    )
    assert len(out["metrics"]["history"]) == 2
    stopped = [e for e in reporter.events if "TensorBoard tracking stopped" in e["message"]]
    assert len(stopped) == 1 and stopped[0]["level"] == "warning"


def test_runs_on_an_object_store(cache: tuple[Settings, str], digits_root: Path, tmp_path: Path, s3_url: str) -> None:
    """On s3:// (moto), as on a local store: each run's file copied whole under its fixed name."""
    settings, key = cache
    folder = Store(s3_url).folder("jobs", "job_1", "tensorboard")
    job = spec(digits_root / "train", sweep={"lr": [0.01, 0.05]}, epochs=2)
    out = train_job(job, settings, key, NullReporter(), tmp_path / "ckpt", None, folder)
    files = folder.files()
    assert sorted(files) == sorted([EVENTS, *(f"config_0{j}-lr={lr}/{EVENTS}" for j, lr in enumerate((0.01, 0.05)))])
    folder.get_tree(tmp_path / "tb", list(files))
    for j, entry in enumerate(out["metrics"]["sweep"]):
        check_curve(read(next((tmp_path / "tb").glob(f"config_0{j}-*"))), entry["history"])


def test_method_auto_writes_each_candidates_runs(
    cache: tuple[Settings, str], digits_root: Path, tmp_path: Path
) -> None:
    settings, key = cache
    job = spec(digits_root / "train", method={"name": "auto"}, epochs=1)
    out = train_job(job, settings, key, NullReporter(), tmp_path / "ckpt", None, tmp_path / "tb")
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["linear", "losa"]
    assert "l2/val_accuracy" in read(tmp_path / "tb" / "linear").Tags()["scalars"]
    assert out["metrics"]["auto"]["selected"] in {"linear", "losa"}
