"""Headless Chromium (Debian's chromium and chromium-driver) driven by Selenium."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Without the background-networking flags Chromium keeps trying Google's hosts, and this
# closed network refuses them many at a time.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1400,1000")


def require_chromium() -> None:
    """Skip where the browser is not installed; under CI (make test installs it) fail."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        message = (f"{', '.join(missing)} missing: "
                   "scripts/ensure-packages.sh chromium chromium-driver")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@contextmanager
def headless_chromium() -> Iterator[webdriver.Chrome]:
    with tempfile.TemporaryDirectory(prefix="agentlink-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            yield driver
        finally:
            driver.quit()


# Every tile drawn, and from a real poll: before the first one every agent is "unknown".
DASHBOARD_DRAWN = """
const tiles = document.querySelectorAll('.tile[data-agent]');
return tiles.length > 0 && ![...tiles].some(t => t.dataset.state === 'unknown');
"""


def save_dashboard(url: str, out: str, ready: str = DASHBOARD_DRAWN, timeout: float = 30) -> None:
    """A screenshot of the health dashboard once the `ready` script returns true."""
    with headless_chromium() as driver:
        driver.get(url)
        WebDriverWait(driver, timeout).until(
            lambda d: d.execute_script(ready), message=f"{url} not drawn within {timeout:g}s")
        driver.save_screenshot(out)
