"""The web page at /ui (api/routes/ui.py, api/ui/): its frames served from the package with a strict
Content-Security-Policy, and in a real headless Chromium (Debian's chromium and chromium-driver, driven by selenium)
against the stack: the jobs list following a job to the end, the job's events and curves, the model's evaluation and
a predict whose scores are read from the page; with API keys, the key prompt, a wrong key's 401 shown as a message,
and only the key's own jobs; a job started from the new-job form (an archive uploaded, the dry run's plan shown, the
API's 422 beside the form) and followed to its model; two jobs compared. Screenshots go to test-artifacts/ui/."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from storage.redis import JobStore
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


# ---- the browser ---------------------------------------------------------------------------------------------------
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--window-size=1280,1800",
]


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Headless Chromium through chromedriver; skipped, saying why, where they are not installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip(
            "Chromium and chromedriver are not installed (apt-get install chromium chromium-driver, as root; "
            ".ci/run installs them)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="sidetune-chromium-")
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, condition, timeout_s: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(lambda d: condition(d))


def css(driver, selector: str) -> list:
    return driver.find_elements("css selector", selector)


def test_follow_a_job_then_predict_in_the_browser(stack, browser, test_artifacts) -> None:
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


# ---- the page does the job: the new-job form, and jobs compared ------------------------------------------------------
def loaded(driver) -> bool:
    return driver.execute_script("return document.body.dataset.loaded") == "done"


def test_start_a_job_from_the_form_and_follow_it_to_its_model(stack, browser, test_artifacts, tmp_path) -> None:
    """The form as a user fills it: `auto` preselected, a 422 of the API shown beside it; then an archive of digits
    uploaded, the dry run's plan shown, the job submitted and followed to its model. The job trains LoSA: `auto` also
    fits the linear probe's cross-validated L-BFGS path, minutes on a busy CPU, and the form sends either alike."""
    from selenium.webdriver.support.ui import Select

    running, client = stack
    digits = running.settings.data_path / "datasets" / "digits"
    (test_artifacts / "ui").mkdir(exist_ok=True)
    archive = shutil.make_archive(str(tmp_path / "digits"), "zip", digits / "train")  # a folder per class at the top
    browser.get(f"{running.api_url}/ui")
    browser.find_element("id", "new-job").click()
    wait_for(browser, loaded)
    method = Select(browser.find_element("id", "method"))
    assert method.first_selected_option.get_attribute("value") == "auto"
    catalog = httpx.get(f"{running.api_url}/catalog").json()
    assert [o.get_attribute("value") for o in method.options] == [m["name"] for m in catalog["methods"]]

    browser.find_element("css selector", 'input[name="source"][value="path"]').click()
    browser.find_element("id", "dataset-path").send_keys(str(digits / "train"))
    backbone = browser.find_element("id", "backbone")
    backbone.clear()
    backbone.send_keys("resnet50")  # not a ViT: the API's 422, beside the form
    browser.find_element("id", "plan-button").click()
    wait_for(browser, lambda d: d.find_element("id", "form-error").is_displayed(), 30)
    error = browser.find_element("id", "form-error").text
    assert error.startswith("HTTP 422") and "'resnet50' is not a timm ViT" in error, error
    assert not browser.find_element("id", "submit-button").is_enabled()

    browser.find_element("css selector", 'input[name="source"][value="upload"]').click()
    browser.find_element("id", "dataset-file").send_keys(archive)
    backbone.clear()
    backbone.send_keys("test_vit")
    browser.find_element("id", "pretrained").click()  # test_vit has no pretrained weights
    browser.find_element("id", "epochs").send_keys("2")
    browser.find_element("id", "job-name").send_keys("digits from the form")
    method.select_by_value("losa")
    assert "LoSA" in browser.find_element("id", "method-description").text
    browser.find_element("id", "plan-button").click()
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.planned") == "yes", 120)
    assert not browser.find_element("id", "form-error").is_displayed()
    uploaded = client.datasets()[0]  # newest first: the form's upload, now the dataset it names
    assert (
        Select(browser.find_element("id", "dataset-id")).first_selected_option.get_attribute("value") == uploaded["id"]
    )
    plan = client.plan(
        {
            "dataset": {"id": uploaded["id"]},
            "backbone": {"name": "test_vit", "pretrained": False},
            "method": {"name": "losa"},
            "training": {"epochs": 2},
        }
    )
    field = lambda name: browser.find_element("css selector", f'#plan-summary dd[data-field="{name}"]').text  # noqa: E731
    assert field("images").startswith(f"{plan['images']}: {plan['train_images']} training")
    assert field("classes") == str(plan["classes"]) and field("method").startswith(
        "losa (mode cache), 4 configurations"
    )
    assert "fits: yes" in field("feature cache") and field("extraction time").endswith("TFLOPS)")
    assert "of features" in field("training memory")
    assert browser.find_element("id", "plan-message").text == plan["message"]
    browser.save_screenshot(str(test_artifacts / "ui" / "new-job-plan.png"))

    browser.find_element("id", "submit-button").click()
    wait_for(browser, lambda d: "/ui/jobs/job_" in d.current_url, 30)
    job_id = browser.current_url.rsplit("/", 1)[1]
    wait_for(browser, loaded, 300)  # followed live until it ended
    job = client.job(job_id)
    assert job["status"] == "succeeded", job.get("error")
    assert job["spec"]["method"]["name"] == "losa" and job["spec"]["dataset"]["id"] == uploaded["id"]
    assert job["spec"]["name"] == "digits from the form" and job["spec"]["training"]["epochs"] == 2
    browser.save_screenshot(str(test_artifacts / "ui" / "new-job-followed.png"))
    browser.find_element("id", "model-link").click()
    wait_for(browser, loaded)
    assert browser.current_url.endswith(f"/ui/models/{job['model_id']}")
    assert len(css(browser, "#evaluation-metrics tr")) == len(client.evaluation(job["model_id"])["metrics"])


def test_compare_two_jobs(stack, browser, test_artifacts) -> None:
    """Two jobs ticked in the list and compared: a row of figures each, both curves drawn in every chart, a link to
    each model's evaluation."""
    running, client = stack
    digits = running.settings.data_path / "datasets" / "digits" / "train"
    jobs = [
        client.submit(
            {
                "name": f"losa rank {rank}",
                "dataset": {"path": str(digits), "test_fraction": 0.2},
                "method": {"name": "losa", "rank": rank},
                "backbone": {"name": "test_vit", "pretrained": False},
                "training": {"epochs": epochs, "batch_size": 16},
            }
        )
        for rank, epochs in ((4, 2), (8, 3))
    ]
    ids = [j["id"] for j in jobs]
    (test_artifacts / "ui").mkdir(exist_ok=True)
    for job_id in ids:
        assert client.wait(job_id)["status"] == "succeeded"
    browser.get(f"{running.api_url}/ui")
    for job_id in ids:
        wait_for(browser, lambda d, j=job_id: css(d, f'#jobs input[data-compare="{j}"]'))
        css(browser, f'#jobs input[data-compare="{job_id}"]')[0].click()
    browser.save_screenshot(str(test_artifacts / "ui" / "jobs-ticked.png"))
    browser.find_element("id", "compare-button").click()
    wait_for(browser, lambda d: "/ui/compare?jobs=" in d.current_url and loaded(d), 60)

    rows = css(browser, "#compare tbody tr")
    assert [r.get_attribute("data-job") for r in rows] == ids
    for row, job_id in zip(rows, ids, strict=True):
        job = client.job(job_id)
        assert row.find_element("css selector", '[data-figure="validation"]').text.endswith(
            f"{job['metrics']['val_accuracy']:.4f}"
        )
        assert row.find_element("css selector", '[data-figure="test"]').text.endswith(
            f"{job['metrics']['test_accuracy']:.4f}"
        )
        link = row.find_element("css selector", "a[data-model]")
        assert link.get_attribute("href").endswith(f"/ui/models/{job['model_id']}#evaluation")
    for chart in ("train-loss-chart", "val-loss-chart", "score-chart"):
        for job_id, epochs in zip(ids, (2, 3), strict=True):
            line = css(browser, f'#{chart} polyline[data-job="{job_id}"]')
            assert len(line) == 1 and len(line[0].get_attribute("points").split()) == epochs, chart
    browser.save_screenshot(str(test_artifacts / "ui" / "compare.png"))

    css(browser, "#compare tbody tr a[data-model]")[0].click()
    wait_for(browser, loaded)
    assert css(browser, "#evaluation-metrics tr")


def test_each_jobs_dataset_shows_its_kind_and_where_it_lives(stack, browser, test_artifacts) -> None:
    """Jobs recorded as the API records them, on every kind of source: the list and each job's page name the kind
    (the format the plan step read, else the one the location implies) and the location: a server path, an upload,
    a Hub id, an object-store URL (never a URL's credentials or query, even in a record that held them)."""
    running, _ = stack
    store = JobStore.from_url(running.redis.url)
    shards = "s3://bucket/shards/{000000..000009}.tar"
    sources = {
        "shards": ({"path": shards}, None, f"WebDataset shards · object store: {shards}"),
        "manifest": (
            {"path": "gs://b/train.jsonl", "test": "/data/t.csv"},
            None,
            "JSONL manifest · object store: gs://b/train.jsonl",
        ),
        "hub": ({"path": "hf://org/name"}, None, "Hugging Face dataset · Hub: org/name"),
        "upload": ({"id": "ds_0a1b", "path": "/srv/datasets/ds_0a1b"}, "imagefolder", "ImageFolder · upload: ds_0a1b"),
        "saved": (
            {"path": "/data/saved", "format": "auto"},
            "huggingface",
            "Hugging Face dataset · server: /data/saved",
        ),
        "leaky": (
            {"path": "s3://AKIA:secret@bucket/x.csv?token=t0"},
            None,
            "CSV manifest · object store: s3://bucket/x.csv",
        ),
    }
    jobs = {}
    for name, (dataset, fmt, _) in sources.items():
        job = store.create_job({"dataset": dataset, "method": {"name": "linear"}, "backbone": {"name": "test_vit"}})
        if fmt:
            store.set_fields(job["id"], dataset_format=fmt)
        jobs[name] = job["id"]
    try:
        browser.get(f"{running.api_url}/ui")
        wait_for(browser, lambda d: all(css(d, f'#jobs tr[data-job="{i}"]') for i in jobs.values()))
        cell = lambda i: css(browser, f'#jobs tr[data-job="{i}"] td.source span')[0]  # noqa: E731
        assert cell(jobs["shards"]).text == "WebDataset shards: {000000..000009}.tar"
        assert cell(jobs["upload"]).text == "ImageFolder: ds_0a1b"
        assert cell(jobs["shards"]).get_attribute("title") == sources["shards"][2]
        browser.save_screenshot(str(test_artifacts / "ui" / "sources.png"))
        for name, job_id in jobs.items():
            browser.get(f"{running.api_url}/ui/jobs/{job_id}")
            wait_for(browser, lambda d: d.execute_script("return document.body.dataset.status"))
            assert browser.find_element("css selector", 'dd[data-field="dataset"]').text == sources[name][2], name
            assert "secret" not in browser.page_source and "token" not in browser.page_source
        browser.get(f"{running.api_url}/ui/jobs/{jobs['manifest']}")
        wait_for(browser, lambda d: css(d, 'dd[data-field="test set"]'))
        assert (
            browser.find_element("css selector", 'dd[data-field="test set"]').text
            == "CSV manifest · server: /data/t.csv"
        )
    finally:
        for job_id in jobs.values():
            store.set_fields(job_id, status="cancelled")
            store.delete_job(job_id)
