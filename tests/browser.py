"""Helpers of the web page's tests in Chromium (tests/api/test_ui*.py; the `browser` fixture is in
tests/api/conftest.py): waiting for the page, finding its elements, its downloads."""

from __future__ import annotations

import time
from pathlib import Path


def wait_for(driver, condition, timeout_s: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(lambda d: condition(d))


def css(driver, selector: str) -> list:
    return driver.find_elements("css selector", selector)


def loaded(driver) -> bool:
    """The page's script has filled it (ui.js sets `data-loaded` on the body last)."""
    return driver.execute_script("return document.body.dataset.loaded") == "done"


def downloads_to(driver, folder: Path) -> None:
    """Files the page downloads go to `folder`, without asking (Chrome DevTools Protocol's
    Browser.setDownloadBehavior)."""
    folder.mkdir(parents=True, exist_ok=True)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})


def downloaded(folder: Path, name: str, timeout_s: float = 60) -> Path:
    """The file `name` once Chromium has finished writing it into `folder` (its partial file gone)."""
    path, deadline = folder / name, time.monotonic() + timeout_s
    while not (path.is_file() and not list(folder.glob("*.crdownload"))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} was not downloaded into {folder}: {sorted(p.name for p in folder.iterdir())}")
        time.sleep(0.2)
    return path
