"""Headless Chromium for the console's browser test and screenshot: Debian's `chromium` and
`chromedriver` (`make chromium` installs them; `make test` and `make e2e` run it), driven by
Selenium with explicit paths, so Selenium Manager never downloads anything."""

from __future__ import annotations

from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Measured to work here (root, no GPU, no network): no sandbox, no background fetches.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars")


def chromium(profile_dir: Path, width: int = 1400, height: int = 1000) -> webdriver.Chrome:
    """A headless Chromium with a fresh profile in ``profile_dir``; raises AssertionError when
    the browser or its driver is missing (a failure, not a skip: `make test` installs them)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        assert path.exists(), f"{path} is missing: run `make chromium` (make test does)"
    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile_dir}")
    opts.add_argument(f"--window-size={width},{height}")
    service = Service(str(CHROMEDRIVER), log_output=str(profile_dir.parent / "chromedriver.log"))
    return webdriver.Chrome(service=service, options=opts)
