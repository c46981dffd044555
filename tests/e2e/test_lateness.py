"""A starved machine loses no request: heartbeats that come late (here: every agent and engine
frozen with SIGSTOP for three times the dead-pod timeout, under load) are not dead pods."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections import Counter

import aiohttp

MODEL = "infermesh/tiny-llama"
WORDS = "alpha beta gamma delta river stone cloud light north quiet engine market".split()


async def _metric_lines(http: aiohttp.ClientSession, url: str, prefix: str) -> list[str]:
    async with http.get(url + "/metrics") as r:
        return [ln for ln in (await r.text()).splitlines() if ln.startswith(prefix)]


async def test_engines_and_agents_frozen_under_load_lose_no_request(stack_factory) -> None:
    # Short timeouts so that the freeze (3 s) is far past them: 6x pod_late_s, 2x pod_timeout_s.
    times = {"pod_late_s": 0.5, "pod_timeout_s": 1.5}
    stack = stack_factory(engines=4, time_scale=0.05,
                          settings={"ingress": times, "scheduler": times, "indexer": times})
    frozen = stack.system.procs("agent") + stack.system.procs("sim")
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    during = 0
    freeze = (0.0, 0.0)

    async def one(http: aiohttp.ClientSession, rng: random.Random) -> None:
        nonlocal during
        prefix = prefixes[rng.randrange(len(prefixes))]
        body = {"model": MODEL, "prompt": prefix + " " + " ".join(rng.choices(WORDS, k=20)),
                "max_tokens": 4, "stream": rng.random() < 0.5}
        sent = time.monotonic()
        if freeze[0] <= sent <= freeze[1]:
            during += 1
        async with http.post(stack.ingress_url + "/v1/completions", json=body) as r:
            data = await r.read()
            statuses[r.status] += 1
            if r.status != 200 or b"failed mid-stream" in data:
                errors.append(f"{r.status}: {data[:300]!r}")

    rng = random.Random(7)
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(6)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def arrivals() -> None:
            # Open loop, 25 requests/s for 8 s: requests keep arriving while everything is frozen.
            tasks = []
            for _ in range(200):
                tasks.append(asyncio.create_task(one(http, rng)))
                await asyncio.sleep(0.04)
            await asyncio.gather(*tasks)

        sender = asyncio.create_task(arrivals())
        await asyncio.sleep(1.5)  # load running on a healthy system
        for p in frozen:
            p.send_signal(signal.SIGSTOP)
        freeze = (time.monotonic(), time.monotonic() + 3.0)
        try:
            await asyncio.sleep(3.0)  # the freeze itself: no heartbeat, no engine answers
        finally:
            for p in frozen:
                p.send_signal(signal.SIGCONT)
        await sender

        assert errors == [], errors[:5]
        assert statuses[200] == 200 and during > 50, (statuses, during)
        # Nobody was dropped for lateness, anywhere.
        dropped = await _metric_lines(http, stack.ingress_url,
                                      "infermesh_ingress_pods_dropped_total")
        assert dropped == [], dropped
        async with http.get(stack.ingress_url + "/health") as r:
            assert (await r.json())["pods"] == 4
    for log_file in stack.system.plan.logs_dir.glob("scheduler*.log"):
        assert "pod_dropped" not in log_file.read_text()
    for log_file in stack.system.plan.logs_dir.glob("indexer*.log"):
        text = log_file.read_text()
        assert "pod_dropped" not in text, [json.loads(x) for x in text.splitlines()
                                           if "pod_dropped" in x][:3]
