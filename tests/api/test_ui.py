"""The web page at /ui (api/routes/ui.py, api/ui/): its frames served from the package with a strict
Content-Security-Policy, and in a real headless Chromium (Debian's chromium and chromium-driver, driven by selenium;
tests/api/conftest.py) against the stack: the jobs list following a job to the end, the job's events and curves, the
model's evaluation, a predict whose scores are read from the page and exports downloaded from its buttons; with API
keys, the key prompt, a wrong key's 401 shown as a message, and only the key's own jobs; a model of many classes
paged. The pages that start and compare jobs: test_ui_jobs.py. Screenshots go to test-artifacts/ui/."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
from fastapi.testclient import TestClient

from storage.redis import JobStore
from tests.browser import css, downloaded, downloads_to, wait_for
from tests.helpers import serve


def test_pages_are_frames_from_the_package_with_a_strict_policy(settings) -> None:
    from api.main import create_app

    with TestClient(create_app(settings)) as http:
        pages = (
            "/ui",
            "/ui/models",
            "/ui/datasets",
            "/ui/jobs/job_x",
            "/ui/models/model_x",
            "/ui/jobs/new",
            "/ui/compare",
        )
        for path in pages:
            r = http.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
            assert "default-src 'none'" in r.headers["content-security-policy"]
            assert "http://" not in r.text and "https://" not in r.text  # nothing fetched from elsewhere
        assert 'data-job-id="&lt;script&gt;"' in http.get("/ui/jobs/<script>").text  # the id goes in as text
        assert (
            http.get("/ui/static/ui.js")
            .headers["content-type"]
            .startswith(("text/javascript", "application/javascript"))
        )
        css = http.get("/ui/static/ui.css")
        assert css.status_code == 200 and "url(" not in css.text and "@import" not in css.text
        assert http.get("/", follow_redirects=False).headers["location"] == "/ui"
        assert not [p for p in http.get("/openapi.json").json()["paths"] if p.startswith("/ui")]


def test_follow_a_job_then_predict_then_export_in_the_browser(stack, browser, test_artifacts, tmp_path) -> None:
    running, client = stack
    shots = test_artifacts / "ui"
    shots.mkdir(exist_ok=True)
    digits = running.settings.data_path / "datasets" / "digits"
    job = client.submit(
        {
            "dataset": {"path": str(digits / "train")},
            "method": {"name": "losa", "rank": 4},
            "backbone": {"name": "test_vit", "pretrained": False},
            "training": {"epochs": 3, "batch_size": 16},
        }
    )

    browser.get(f"{running.api_url}/ui")
    row = f'#jobs tr[data-job="{job["id"]}"]'
    wait_for(browser, lambda d: css(d, row))
    browser.save_screenshot(str(shots / "jobs-live.png"))
    wait_for(browser, lambda d: css(d, f'{row}[data-status="succeeded"]'), 300)  # updated in place, no reload
    browser.save_screenshot(str(shots / "jobs.png"))

    css(browser, f"{row} a")[0].click()
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.loaded") == "done")
    events = client.events(job["id"], limit=1000)
    assert len(css(browser, "#events tbody tr")) == len(events)
    assert css(browser, "#events tbody tr")[-1].text.endswith(events[-1]["message"])
    assert len(css(browser, "#loss-chart circle.s0")) == 3 == len(css(browser, "#score-chart circle.s0"))  # 3 epochs
    shown = browser.find_element("css selector", 'dd[data-field="dataset"]').text
    assert shown == f"ImageFolder · server: {digits / 'train'}"  # the format the plan step read it in
    browser.save_screenshot(str(shots / "job.png"))

    model_id = client.job(job["id"])["model_id"]
    browser.find_element("id", "model-link").click()
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.loaded") == "done")
    report = client.evaluation(model_id)
    shown = {
        r.get_attribute("data-metric"): float(r.find_element("tag name", "td").text)
        for r in css(browser, "#evaluation-metrics tr")
    }
    assert shown == pytest.approx({k: round(v, 4) for k, v in report["metrics"].items()}, abs=1e-9)
    cells = [[int(td.text) for td in tr.find_elements("tag name", "td")] for tr in css(browser, "#confusion tr")[1:]]
    assert cells == report["confusion_matrix"]
    assert len(css(browser, "#plots img")) == len(client.model(model_id)["plots"])

    images = sorted((digits / "holdout").glob("*/*.png"))[:3]
    browser.find_element("id", "predict-files").send_keys("\n".join(str(p) for p in images))
    browser.find_element("css selector", "#predict-form button").click()
    wait_for(browser, lambda d: len(css(d, "#predictions tbody tr")) == 3)
    expected = client.predict(model_id, images)
    for tr, path, p in zip(css(browser, "#predictions tbody tr"), images, expected, strict=True):
        assert tr.get_attribute("data-file") == path.name and tr.get_attribute("data-label") == p["label"]
        scores = {
            s.get_attribute("data-class"): float(s.get_attribute("data-score"))
            for s in tr.find_elements("css selector", ".score")
        }
        assert len(scores) == 5 and all(scores[c] == pytest.approx(p["scores"][c], abs=1e-6) for c in scores)
        assert max(scores, key=scores.get) == p["label"]
    browser.execute_script("document.getElementById('predict').scrollIntoView()")
    browser.save_screenshot(str(shots / "model.png"))

    # the registry formats' buttons download through the API like the others: an MLflow model, a Hub folder
    downloads = tmp_path / "downloads"
    downloads_to(browser, downloads)
    browser.execute_script("document.getElementById('export').scrollIntoView()")
    for fmt in ("mlflow", "hf"):
        name = f"{model_id}-{fmt}.zip"
        browser.find_element("css selector", f'#export button[data-format="{fmt}"]').click()
        wait_for(browser, lambda d, n=name: d.find_element("id", "export-status").text == f"Downloaded {n}.")
        with zipfile.ZipFile(downloaded(downloads, name)) as z:
            files = set(z.namelist())
        if fmt == "mlflow":
            assert {"MLmodel", "README.md"} <= files, files
        else:  # LoSA, a side network: the adapter layout and its card
            assert files == {"README.md", "adapter_config.json", "adapter_model.safetensors"}, files
    browser.save_screenshot(str(shots / "model-exported.png"))


def test_with_api_keys_the_page_asks_and_shows_a_401_as_a_message(stack, browser, test_artifacts) -> None:
    running, _ = stack
    from api.main import create_app

    store = JobStore.from_url(running.redis.url)
    spec = {"method": {"name": "losa"}, "backbone": {"name": "test_vit"}}
    mine = store.create_job(spec, owner=hashlib.sha256(b"key-a").hexdigest()[:16])
    theirs = store.create_job(spec, owner=hashlib.sha256(b"key-b").hexdigest()[:16])
    settings = running.settings.model_copy(update={"redis_url": running.redis.url, "api_keys": ["key-a", "key-b"]})
    try:
        with serve(create_app(settings)) as url:
            browser.get(f"{url}/ui")
            wait_for(browser, lambda d: d.find_element("id", "key-form").is_displayed())
            assert "needs an API key" in browser.find_element("id", "message").text
            assert not browser.find_element("id", "content").is_displayed()

            browser.find_element("id", "key-input").send_keys("not-a-key\n")
            wait_for(browser, lambda d: "HTTP 401" in d.find_element("id", "message").text)
            message = browser.find_element("id", "message").text
            assert "a valid API key is required" in message and browser.find_element("id", "key-form").is_displayed()
            assert not css(browser, "#jobs tbody tr")
            browser.save_screenshot(str(test_artifacts / "ui" / "wrong-key.png"))

            browser.find_element("id", "key-input").send_keys("key-a\n")
            wait_for(browser, lambda d: css(d, f'#jobs tr[data-job="{mine["id"]}"]'))
            assert not css(browser, f'#jobs tr[data-job="{theirs["id"]}"]')  # another key's job is not shown
            assert not browser.find_element("id", "message").is_displayed()
            browser.save_screenshot(str(test_artifacts / "ui" / "key-a.png"))
            browser.get(f"{url}/ui/jobs/new")  # the form reads the catalog and the datasets with the key
            wait_for(browser, lambda d: d.execute_script("return document.body.dataset.loaded") == "done", 30)
            assert browser.find_element("id", "method").get_attribute("value") == "auto"
            assert not browser.find_element("id", "message").is_displayed()
            browser.execute_script("sessionStorage.clear()")
    finally:
        for job in (mine, theirs):
            store.set_fields(job["id"], status="cancelled")
            store.delete_job(job["id"])


def test_a_model_of_many_classes_pages_its_per_class_rows(stack, browser, test_artifacts) -> None:
    """250 classes (a report and a record written as the train step writes them): the page shows 100 per-class rows
    at a time with previous/next, and the most frequent confusions instead of a table of 62,500 cells."""
    import numpy as np

    from services.training import evaluation, reports
    from storage.artifacts import ArtifactStore
    from storage.redis import now

    running, _ = stack
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 250, 1000)
    pred = np.where(rng.random(1000) < 0.6, targets, rng.integers(0, 250, 1000))
    report = evaluation.label_report(targets, pred, None, [f"class {i:03d}" for i in range(250)], "test")
    ArtifactStore.from_settings(running.settings).save_model(
        "model_ui_250", {"w": np.zeros(1, np.float32)}, {}, {}, {"evaluation.json": reports.encode(report)}
    )
    JobStore.from_url(running.redis.url).register_model(
        {
            "id": "model_ui_250",
            "object": "model",
            "created_at": now(),
            "job_id": "job_ui_250",
            "owner": None,
            "method": "linear",
            "mode": "cache",
            "backbone": "test_vit",
            "classes": report["classes"],
            "metrics": {},
            "plots": [],
        }
    )
    browser.get(f"{running.api_url}/ui/models/model_ui_250")
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.loaded") == "done")
    # read in one script: the rows are replaced while a page loads (elements found before would go stale)
    script = "return [...document.querySelectorAll('#per-class tbody tr')].map((tr) => tr.dataset.class)"
    rows = lambda: browser.execute_script(script)  # noqa: E731
    assert rows() == report["classes"][:100]
    assert browser.find_element("id", "per-class-range").text == "classes 1-100 of 250"
    assert not css(browser, "#confusion tr") and browser.find_element("id", "top-confusions").is_displayed()
    shown = [[td.text for td in tr.find_elements("tag name", "td")] for tr in css(browser, "#top-confusions tbody tr")]
    assert shown == [[c["true"], c["predicted"], str(c["count"])] for c in report["top_confusions"]]
    browser.find_element("id", "per-class-next").click()
    wait_for(browser, lambda d: rows() == report["classes"][100:200], 30)
    browser.find_element("id", "per-class-next").click()
    wait_for(browser, lambda d: rows() == report["classes"][200:], 30)
    assert not browser.find_element("id", "per-class-next").is_enabled()
    (test_artifacts / "ui").mkdir(exist_ok=True)
    browser.save_screenshot(str(test_artifacts / "ui" / "many-classes.png"))
    browser.find_element("id", "per-class-prev").click()
    wait_for(browser, lambda d: rows() == report["classes"][100:200], 30)
