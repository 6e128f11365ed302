"""The web page doing the job, in a real headless Chromium against the stack (api/ui/new_job.js, compare.js, ui.js;
the browser: tests/api/conftest.py): a job started from the new-job form (an archive uploaded, the dry run's plan
shown, the API's 422 beside the form) and followed to its model; two jobs compared; each job's dataset named by its
kind and where it lives. Screenshots go to test-artifacts/ui/."""

from __future__ import annotations

import shutil

import httpx

from storage.redis import JobStore
from tests.browser import css, loaded, wait_for


def test_start_a_job_from_the_form_and_follow_it_to_its_model(stack, browser, test_artifacts, tmp_path) -> None:
    """The form as a user fills it: `auto` preselected, a 422 of the API shown beside it; then an archive of digits
    uploaded, the dry run's plan shown, the job submitted with the preselected `auto` (the linear probe and LoSA, the
    better kept: on these 130 images a few seconds more than LoSA alone) and followed to its model."""
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
    assert method.first_selected_option.get_attribute("value") == "auto"  # still: the job keeps it
    assert "LoSA" in browser.find_element("id", "method-description").text  # auto: the linear probe and LoSA
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
            "method": {"name": "auto"},
            "training": {"epochs": 2},
        }
    )
    field = lambda name: browser.find_element("css selector", f'#plan-summary dd[data-field="{name}"]').text  # noqa: E731
    assert field("images").startswith(f"{plan['images']}: {plan['train_images']} training")
    assert field("classes") == str(plan["classes"]) and field("method") == "auto (mode cache)"
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
    assert job["spec"]["method"]["name"] == "auto" and job["spec"]["dataset"]["id"] == uploaded["id"]
    kept = client.model(job["model_id"])["method"]
    assert kept in ("linear", "losa") and any(
        e["message"].startswith(f"method auto: {kept} kept") for e in client.events(job_id, limit=1000)
    )
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
