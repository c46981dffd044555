"""`make console-screenshot`: docs/img/console.png, the fleet console on a running system.

Starts the local system as `infermesh up --autoscale` would (4 simulated engines, the autoscaler
between 2 and 4, the console) on free ports in a temporary folder, sends a workload of shared
documents with a few questions each (so prefixes repeat and the cache hits), and takes the
screenshot in headless Chromium while requests are still running. Run from the repository
root: ``python -m tests.e2e.screenshot_console [OUT.png]``.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import threading
from pathlib import Path

import aiohttp
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from infermesh.libs.tinymodel import ensure_model_folder
from infermesh.services.system.plan import plan
from infermesh.services.system.run import LocalSystem
from infermesh.services.system.spec import SystemSpec

from ..browser import chromium

MODEL = "infermesh/tiny-llama"
VOCAB = ("alpha beta gamma delta river stone cloud light north quiet engine market window "
         "garden silver paper harbor signal").split()


async def _load(url: str, stop: threading.Event, concurrency: int = 6) -> None:
    """Questions on eight documents, ``concurrency`` at a time, until ``stop``."""
    rng = random.Random(14)
    docs = [" ".join(rng.choice(VOCAB) for _ in range(rng.randint(250, 600)))
            for _ in range(8)]

    async def worker(http: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while not stop.is_set():
            doc = docs[rng.randrange(len(docs))]
            body = {"model": MODEL, "prompt": f"{doc}\nQuestion {n}.{i}: what is it about?",
                    "max_tokens": rng.randint(16, 96)}
            async with http.post(url + "/v1/completions", json=body) as r:
                await r.read()
            i += 1

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http, n) for n in range(concurrency)))


def main(argv: list[str] | None = None) -> int:
    """Start the system, load it, take the screenshot, stop everything."""
    out = Path((argv or sys.argv[1:] or ["docs/img/console.png"])[0]).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="console-shot-") as tmp:
        # Held at 4 by the autoscaler; fewer KV blocks than the simulator's default, so that
        # the requests in flight show on the KV bars.
        spec = SystemSpec(engines=4, autoscale=True, free_ports=True, state_dir=f"{tmp}/state",
                          num_gpu_blocks=1200,
                          settings={"autoscaler": {"min_replicas": 4, "max_replicas": 4}})
        plan_ = plan(spec)
        ensure_model_folder(plan_.model_dir)
        stop = threading.Event()
        with LocalSystem(plan_) as system:
            load = threading.Thread(target=lambda: asyncio.run(_load(system.url, stop)))
            load.start()
            browser = chromium(Path(tmp) / "chromium", width=1400, height=1080)
            try:
                (console,) = plan_.of_kind("console")
                browser.get(console.links["console"] + "?decisions=12")
                wait = WebDriverWait(browser, 90, poll_frequency=0.2)
                # A minute of history, rows in the table, a decision of the autoscaler and
                # some requests in the engines when the picture is taken.
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chart rect")) >= 30)
                wait.until(lambda d: len(d.find_elements(
                    By.CSS_SELECTOR, "#decisions tbody tr")) >= 12)
                wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#autoscaler .big"))
                wait.until(lambda d: d.find_element(By.ID, "t-queue").text not in
                           ("0 / 0", "–"))
                height = browser.execute_script("return document.body.scrollHeight")
                browser.set_window_size(1400, int(height) + 140)  # the whole page, no more
                browser.save_screenshot(str(out))
            finally:
                browser.quit()
                stop.set()
                load.join(30)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
