"""The fleet console in a real browser (headless Debian Chromium) on the real system: the page
loads, shows the running pods, and shows a request the moment it is routed."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

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


def _pods_shown(driver: webdriver.Chrome) -> set[str]:
    return {e.get_attribute("data-pod") or "" for e in
            driver.find_elements(By.CSS_SELECTOR, "#pods .pod.ready")}


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
    assert not browser.find_elements(By.CSS_SELECTOR, "#decisions tbody tr")

    pod = _complete(stack.ingress_url, "console-e2e-1")
    assert pod in stack.pods
    row = wait.until(lambda d: d.find_element(
        By.CSS_SELECTOR, '#decisions tbody tr[data-request-id="console-e2e-1"]'))
    assert row.get_attribute("data-pod") == pod
    cells = row.find_elements(By.TAG_NAME, "td")
    assert cells[2].text == pod and cells[3].text == "default"
    # The scores of the candidates, the chosen pod's marked.
    chosen = row.find_element(By.CSS_SELECTOR, ".score.chosen")
    assert chosen.text.startswith(pod + " ")
    # Its outcome follows on the same row, and the pod's card counts it.
    wait.until(lambda d: d.find_element(
        By.CSS_SELECTOR, '#decisions tbody tr[data-request-id="console-e2e-1"] td:last-child'
    ).text == "ok")
    card = browser.find_element(By.CSS_SELECTOR, f'#pods .pod[data-pod="{pod}"]')
    assert "routed 1" in card.text
    browser.save_screenshot(str(tmp_path / "console.png"))  # kept with the test's logs
