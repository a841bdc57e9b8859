"""Headless Chromium driven through selenium, for the tests that open pages as a user does."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=900,1000",
)


@contextmanager
def headless_chromium() -> Iterator[Any]:
    """Yield a selenium driver of the system's Chromium with a profile of its own.

    Skips, naming what is missing, without selenium, chromium or chromium-driver.
    """
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not tool.exists():
            pytest.skip(f"{tool.name} is not installed (Debian: chromium, chromium-driver)")
    profile = tempfile.mkdtemp(prefix="gateway-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options
    )
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
