"""The simulator's start-up delay (``--startup-delay-s``, × time_scale, counted from the
process's start as vLLM's is from its launch): until it has passed nothing listens, so the
agent's scrape of /metrics is refused (its heartbeat: not ready); then the engine serves at
once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import aiohttp
import pytest

from infermesh.libs.process.ports import free_port
from infermesh.services.agent.scrape import scrape_engine
from infermesh.services.sim import service
from infermesh.services.sim.config import SimConfig
from infermesh.services.sim.service import SimService

MODEL = "infermesh/tiny-llama"


async def _start(delay_s: float, time_scale: float) -> tuple[SimService, asyncio.Task[None],
                                                              str, float]:
    port = free_port()
    svc = SimService(SimConfig(http_port=port, kv_events=False, time_scale=time_scale,
                               startup_delay_s=delay_s))
    t0 = time.monotonic()
    task = asyncio.create_task(svc.start())
    return svc, task, f"http://127.0.0.1:{port}", t0


async def _wait_serving(http: aiohttp.ClientSession, url: str, timeout: float) -> int:
    """Scrape as the agent does until the engine answers ready; the refused scrapes before."""
    refused = 0
    deadline = time.monotonic() + timeout
    while True:
        try:
            load = await scrape_engine(http, url, "", None)
        except aiohttp.ClientConnectorError:
            refused += 1
        else:
            assert load.ready
            return refused
        assert time.monotonic() < deadline, "the engine never came up"
        await asyncio.sleep(0.05)


async def test_nothing_listens_until_the_scaled_delay_has_passed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "process_age_s", lambda: 0.0)  # as if just launched
    # 4 modelled seconds at time scale 0.25: 1 s of wall clock.
    svc, task, url, t0 = await _start(4.0, 0.25)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            refused = await _wait_serving(http, url, 10)
            up_after = time.monotonic() - t0
            await task
            async with http.get(url + "/v1/models") as r:
                assert r.status == 200
                assert (await r.json())["data"][0]["id"] == MODEL
    finally:
        await svc.stop()
    assert up_after >= 1.0, up_after
    assert refused >= 5  # the agent's scrapes saw a booting engine, not a ready one


async def test_no_delay_by_default() -> None:
    assert SimConfig().startup_delay_s == 0.0
    svc, task, url, t0 = await _start(0.0, 1.0)
    try:
        await asyncio.wait_for(task, 10)  # start() returns once serving: no wait inside
        async with aiohttp.ClientSession() as http:
            assert await _wait_serving(http, url, 5) == 0
    finally:
        await svc.stop()


async def test_the_process_start_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    # Launched 0.8 s ago: of a 1 s delay 0.2 s are left.
    monkeypatch.setattr(service, "process_age_s", lambda: 0.8)
    svc, task, url, t0 = await _start(4.0, 0.25)
    try:
        await asyncio.wait_for(task, 10)
        waited = time.monotonic() - t0
    finally:
        await svc.stop()
    assert 0.2 <= waited < 0.8, waited


def test_process_age_of_a_fresh_process() -> None:
    code = "from infermesh.services.sim.service import process_age_s; print(process_age_s())"
    t0 = time.monotonic()
    age = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                               text=True).stdout)
    assert 0 < age <= time.monotonic() - t0 + 0.05  # clock ticks: 10 ms resolution


def test_a_negative_delay_is_refused() -> None:
    with pytest.raises(ValueError, match="startup_delay_s"):
        SimConfig(startup_delay_s=-1)
