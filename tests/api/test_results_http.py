"""Results over real HTTP against the real processes (`stack`): a held-out test split and its evaluation report, a
sweep, plots, `sidetune report`, multi-label classification end to end, and the refusals of bad sweeps and splits."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from tests.helpers import plan_failure
from worker.cli import main as cli

BACKBONE = {"name": "test_vit", "pretrained": False}


def digits(stack) -> Path:
    running, _ = stack
    return running.settings.data_path / "datasets" / "digits"


def job(stack, **body) -> dict:
    return {"dataset": {"path": str(digits(stack) / "train")}, "backbone": BACKBONE, **body}


def submit_and_wait(stack, body: dict) -> dict:
    _, client = stack
    done = client.wait(client.submit(body)["id"], timeout_s=600)
    assert done["status"] == "succeeded", done["error"]
    return done


def get(stack, path: str, **params) -> httpx.Response:
    running, _ = stack
    return httpx.get(f"{running.api_url}{path}", params=params, timeout=30)


def test_sweep_with_a_test_split_report_and_plots(stack, tmp_path, capsys) -> None:
    running, client = stack
    sweep = {"lr": [0.01, 0.05], "rank": [2, 4]}
    body = job(stack, method={"name": "losa"}, training={"epochs": 2}, sweep=sweep)
    body["dataset"]["test_fraction"] = 0.2
    done = submit_and_wait(stack, body)
    m = done["metrics"]
    assert m["configurations"] == 4 and [e["config"] for e in m["sweep"]][0] == {"lr": 0.01, "rank": 2}
    assert all(len(e["history"]) == 2 for e in m["sweep"]) and m["selected"] in [e["config"] for e in m["sweep"]]
    assert m["test_images"] > 0 and 0 <= m["test_accuracy"] <= 1 and "val_accuracy" in m

    model = get(stack, f"/models/{done['model_id']}").json()
    assert model["evaluation"]["split"] == "test" and model["evaluation"]["test_accuracy"] == m["test_accuracy"]
    assert model["plots"] == ["confusion", "curves"]
    report = get(stack, f"/models/{done['model_id']}/evaluation").json()
    assert report["split"] == "test" and report["images"] == m["test_images"]
    assert len(report["confusion_matrix"]) == 10 and sum(map(sum, report["confusion_matrix"])) == m["test_images"]
    assert {"test_accuracy", "test_balanced_accuracy", "test_top5_accuracy", "test_macro_f1"} <= set(report["metrics"])
    for name in model["plots"]:
        png = get(stack, f"/models/{done['model_id']}/plots/{name}.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG")
    assert get(stack, f"/models/{done['model_id']}/plots/nothing.png").status_code == 404
    assert get(stack, "/models/model_unknown/evaluation").status_code == 404
    image = base64.b64encode(sorted((digits(stack) / "holdout").glob("*/*.png"))[0].read_bytes()).decode()
    r = httpx.post(
        f"{running.api_url}/v1/models/{done['model_id']}:predict",
        json={"instances": [{"image_b64": image}], "threshold": 0.3},
        timeout=30,
    )
    assert r.status_code == 422 and "is single-label" in r.json()["error"]["message"]

    assert cli(["report", done["model_id"], "--url", running.api_url, "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "test_accuracy" in out and "confusion matrix" in out and "sweep: 4 configurations" in out
    assert (tmp_path / "plots" / "curves.png").read_bytes().startswith(b"\x89PNG")


def tags_of(digit: int) -> str:
    return "|".join(
        ["even" if digit % 2 == 0 else "odd", "small" if digit < 5 else "large"]
        + (["loop"] if digit in (0, 6, 8, 9) else [])
    )


def test_multi_label_end_to_end(stack, tmp_path, capsys) -> None:
    running, client = stack
    root = digits(stack)
    rows = [f"{p.relative_to(root)},{tags_of(int(p.parent.name))}" for p in sorted((root / "train").glob("*/*.png"))]
    (root / "tags.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    body = {
        "dataset": {"path": str(root / "tags.csv"), "multi_label": True, "test_fraction": 0.25},
        "backbone": BACKBONE,
        "method": {"name": "linear"},
    }
    done = submit_and_wait(stack, body)
    m = done["metrics"]
    assert "val_map" in m and "test_map" in m and "test_micro_f1" in m and m["solver"] == "lbfgs"

    model = get(stack, f"/models/{done['model_id']}").json()
    assert model["multi_label"] and model["classes"] == ["even", "large", "loop", "odd", "small"]
    assert 0 < model["threshold"] < 1
    report = get(stack, f"/models/{done['model_id']}/evaluation").json()
    assert report["split"] == "test" and len(report["per_class"]) == 5
    assert all("average_precision" in row for row in report["per_class"])

    images = sorted((root / "holdout").glob("*/*.png"))[:3]
    predictions = client.predict(done["model_id"], images)
    for p in predictions:
        assert set(p["scores"]) == set(model["classes"]) and all(0 <= s <= 1 for s in p["scores"].values())
        assert p["labels"] == [c for c in model["classes"] if p["scores"][c] >= model["threshold"]]
    everything = client.predict(done["model_id"], images, threshold=0.0)
    assert all(p["labels"] == model["classes"] for p in everything)
    files = httpx.post(
        f"{running.api_url}/v1/models/{done['model_id']}:predict-files",
        params={"threshold": 0.0},
        files=[("files", ("a.png", images[0].read_bytes(), "image/png"))],
        timeout=60,
    )
    assert files.status_code == 200 and files.json()["predictions"][0]["labels"] == model["classes"]
    assert cli(["report", done["model_id"], "--url", running.api_url, "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert f"tags predicted at scores >= {model['threshold']:g}" in out and "test_map" in out


def test_a_multi_label_row_without_tags_fails_the_job_naming_it(stack) -> None:
    root = digits(stack)
    first = sorted((root / "train").glob("*/*.png"))[:6]
    lines = [f"{p.relative_to(root)},{'|' if i == 2 else tags_of(int(p.parent.name))}" for i, p in enumerate(first)]
    (root / "bad_tags.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
    running, _ = stack
    body = {
        "dataset": {"path": str(root / "bad_tags.csv"), "multi_label": True},
        "backbone": BACKBONE,
        "method": {"name": "linear"},
    }
    error = plan_failure(running.api_url, body)  # read by the plan step, in a worker
    assert error["code"] == "invalid_dataset" and "line 4: an empty tag list" in error["message"]


def small_dataset(stack, per_class: int) -> Path:
    """Two classes with `per_class` images each, copied from the digits."""
    root = digits(stack).parent / f"tiny_{per_class}"
    for c in ("0", "1"):
        for p in sorted((digits(stack) / "train" / c).glob("*.png"))[:per_class]:
            (root / c).mkdir(parents=True, exist_ok=True)
            (root / c / p.name).write_bytes(p.read_bytes())
    return root


@pytest.mark.parametrize(
    ("change", "status", "needle"),
    [
        ({"sweep": {"depth": [1, 2]}}, 422, "sweep.depth"),
        ({"sweep": {}}, 422, "the sweep is empty"),
        ({"sweep": {"rank": []}}, 422, "sweep.rank"),
        ({"sweep": {"rank": [2, 4]}}, 422, "method 'linear' has no field 'rank'"),
        ({"method": {"name": "apla"}, "sweep": {"rank": [2, 4]}}, 422, "sweeps take lr and weight_decay only"),
        ({"method": {"name": "losa"}, "sweep": {"lr": [0.001 * (i + 1) for i in range(65)]}}, 422, "at most 64"),
        ({"dataset": {"val_fraction": 0.6, "test_fraction": 0.4}}, 422, "must be below 1"),
        ({"dataset": {"tiny": 1}}, "failed", "the validation split is empty"),  # the plan step's: it reads the data
    ],
)
def test_bad_sweeps_and_splits_are_422_naming_the_cause(stack, change: dict, status: int, needle: str) -> None:
    running, _ = stack
    body = job(stack, method={"name": "linear"})
    for key, value in change.items():
        if key == "dataset" and "tiny" in value:
            body["dataset"]["path"] = str(small_dataset(stack, value["tiny"]))
        elif key == "dataset":
            body["dataset"].update(value)
        else:
            body[key] = value
    if status == "failed":  # refused by the plan step, which reads the dataset in a worker: the job fails
        assert needle in plan_failure(running.api_url, body)["message"]
        return
    r = httpx.post(f"{running.api_url}/jobs", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.text


def test_predict_threshold_is_validated(stack) -> None:
    running, _ = stack
    image = base64.b64encode(b"x").decode()
    for value, message in (
        (1.5, "less than or equal to 1"),
        ("0.5", "a valid number"),
        (True, "a valid number"),
        (float("nan"), "a finite number"),
    ):
        r = httpx.post(
            f"{running.api_url}/v1/models/model_x:predict",
            content=json.dumps({"instances": [{"image_b64": image}], "threshold": value}),
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert r.status_code == 422 and "threshold" in r.text and message in r.text, (value, r.text)
    r = httpx.post(
        f"{running.api_url}/v1/models/model_x:predict-files",
        params={"threshold": "nan"},
        files=[("files", ("a.png", b"x", "image/png"))],
        timeout=30,
    )
    assert r.status_code == 422 and "a finite number" in r.text
