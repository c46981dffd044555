"""The fleet console in a real browser (headless Debian Chromium) on the real system: the page
loads, shows the running pods, and shows a request the moment it is routed."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from ..browser import chromium

MODEL = "infermesh/tiny-llama"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    driver = chromium(tmp_path / "chromium")
    try:
        yield driver
    finally:
        driver.quit()


# The page redraws up to 4 times a second: each read is one script, atomic in the page, rather
# than element handles that a redraw makes stale.
PODS_JS = "return [...document.querySelectorAll('#pods .pod.ready')].map(e => e.dataset.pod)"
CARD_JS = "const c = document.querySelector(`#pods .pod[data-pod='${arguments[0]}']`);" \
    "return c ? c.innerText : ''"
ROW_JS = """
const r = document.querySelector(`#decisions tbody tr[data-request-id='${arguments[0]}']`);
if (!r) return null;
const chosen = r.querySelector(".score.chosen");
return {pod: r.dataset.pod, cells: [...r.cells].map((c) => c.innerText.trim()),
        chosen: chosen ? chosen.innerText : ""};
"""


def _pods_shown(driver: webdriver.Chrome) -> set[str]:
    return set(driver.execute_script(PODS_JS))


def _row(driver: webdriver.Chrome, request_id: str) -> dict[str, Any] | None:
    return driver.execute_script(ROW_JS, request_id)  # type: ignore[no-any-return]


def _complete(ingress: str, request_id: str) -> str:
    """One completion through the ingress; the pod that served it."""
    body = json.dumps({"model": MODEL, "prompt": "The console watches " * 20,
                       "max_tokens": 4}).encode()
    req = urllib.request.Request(ingress + "/v1/completions", data=body, headers={
        "Content-Type": "application/json", "X-Request-Id": request_id})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        return str(r.headers["x-infermesh-endpoint"])


def test_the_page_shows_the_pods_and_each_routed_request(stack_factory, browser,
                                                         tmp_path: Path) -> None:
    stack = stack_factory(engines=2, console=True)
    (console,) = stack.system.plan.of_kind("console")
    wait = WebDriverWait(browser, 30, poll_frequency=0.1)
    browser.get(console.links["console"])
    assert browser.title == "infermesh · fleet console"
    wait.until(lambda d: _pods_shown(d) == set(stack.pods))
    assert browser.find_element(By.ID, "status").text == "live"
    assert browser.find_element(By.ID, "t-pods").text == "2 / 2"
    assert browser.execute_script("return document.querySelector('#decisions tbody').rows"
                                  ".length") == 0

    pod = _complete(stack.ingress_url, "console-e2e-1")
    assert pod in stack.pods
    row = wait.until(lambda d: _row(d, "console-e2e-1"))
    assert row["pod"] == pod
    assert row["cells"][2] == pod and row["cells"][3] == "default"
    # The scores of the candidates, the chosen pod's marked.
    assert row["chosen"].startswith(pod + " ")
    # Its outcome follows on the same row, and the pod's card counts it.
    wait.until(lambda d: (_row(d, "console-e2e-1") or {"cells": [""]})["cells"][-1] == "ok")
    assert "routed 1" in " ".join(browser.execute_script(CARD_JS, pod).split())
    browser.save_screenshot(str(tmp_path / "console.png"))  # kept with the test's logs
