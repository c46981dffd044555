"""Active-active control plane under load (issue 6, points 1 and 3), with real processes.

Four engines, two scheduler replicas and two indexer replicas behind the ingress. Shared-prefix
traffic flows at a steady concurrency while replicas are killed with SIGKILL:

1. an indexer replica dies mid-phase: no request fails, the prefix-cache hit rate stays within
   5 points of the phase before;
2. a scheduler replica dies mid-phase: the same;
3. the last scheduler dies (the control plane is away): requests still succeed, routed by the
   ingress from the engines' last-known load;
4. a scheduler starts again: cache-aware routing resumes (hit rate back within 5 points) and the
   ingress stops falling back.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import aiohttp

from ..stack import start_stack
from .helpers import services_ready

MODEL = "infermesh/tiny-llama"
GROUPS = 8
CONCURRENCY = 4
PER_PHASE = 64


@dataclass
class Result:
    status: int
    pod: str
    prompt: int
    cached: int
    latency: float


def _text(rng: random.Random, words: int) -> str:
    vocab = ("atlas bronze canyon delta eagle falcon glacier horizon island jungle kestrel "
             "lantern mosaic nebula oasis pebble").split()
    return " ".join(rng.choice(vocab) for _ in range(words))


def hit_rate(rs: list[Result]) -> float:
    return sum(r.cached for r in rs) / max(1, sum(r.prompt for r in rs))


async def _metric(http: aiohttp.ClientSession, url: str, line_start: str) -> float:
    async with http.get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_killing_replicas_loses_nothing_and_routing_stays_cache_aware(procs, nats_server):
    # The scheduler service decides (the ingress's own replica would make the replicas moot).
    stack = start_stack(procs, nats_server, engines=4, schedulers=2, indexers=2,
                        settings={"ingress": {"schedule_here": False}})
    rng = random.Random(11)
    prefixes = [_text(rng, 300) for _ in range(GROUPS)]
    url = stack.ingress_url

    async def one(http: aiohttp.ClientSession, g: int) -> Result:
        body = {"model": MODEL, "prompt": prefixes[g] + " " + _text(rng, 12), "max_tokens": 2}
        t0 = time.monotonic()
        async with http.post(url + "/v1/completions", json=body) as r:
            data = await r.json()
            lat = time.monotonic() - t0
            if r.status != 200:
                return Result(r.status, "", 0, 0, lat)
            u = data["usage"]
            return Result(200, r.headers["x-infermesh-endpoint"], u["prompt_tokens"],
                          (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0), lat)

    async def phase(http: aiohttp.ClientSession, n: int = PER_PHASE,
                    at: int | None = None, fault: object = None) -> tuple[list[Result], float]:
        """``n`` requests over the groups at CONCURRENCY; after ``at`` of them, ``fault()``."""
        out: list[Result] = []
        todo = list(range(n))
        t_fault = 0.0

        async def worker() -> None:
            nonlocal t_fault
            while todo:
                i = todo.pop(0)
                if at is not None and i == at:
                    t_fault = time.monotonic()
                    fault()  # type: ignore[operator]
                out.append(await one(http, i % GROUPS))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return out, t_fault

    async with aiohttp.ClientSession() as http:
        # Warm every group's prefix onto some engine (each group twice, one at a time).
        for g in list(range(GROUPS)) * 2:
            assert (await one(http, g)).status == 200
        before, _ = await phase(http)

        # 1. An indexer replica dies under load.
        idx_phase, _ = await phase(http, at=8, fault=stack.indexers[0].kill)
        assert not stack.indexers[0].alive() and stack.indexers[1].alive()
        # 2. A scheduler replica dies under load.
        sch_phase, _ = await phase(http, at=8, fault=stack.schedulers[0].kill)
        assert not stack.schedulers[0].alive() and stack.schedulers[1].alive()
        fallbacks_before = await _metric(
            http, url, 'infermesh_ingress_fallbacks_total{reason="scheduler_unavailable"}')

        # 3. The last scheduler dies: the ingress routes by last-known load.
        away, _ = await phase(http, n=32, at=0, fault=stack.schedulers[1].kill)
        fallbacks_away = await _metric(
            http, url, 'infermesh_ingress_fallbacks_total{reason="scheduler_unavailable"}')

        # 4. A scheduler comes back: cache-aware routing resumes by itself.
        t_back = time.monotonic()
        stack.schedulers.append(procs.service(
            "scheduler", "--nats-url", nats_server.url, "--http-port", "-1", name="scheduler-2"))
        await services_ready(nats_server.url)
        t_ready = time.monotonic()
        resumed, _ = await phase(http)
        fallbacks_after = await _metric(
            http, url, 'infermesh_ingress_fallbacks_total{reason="scheduler_unavailable"}')

    phases = {"before": before, "indexer killed": idx_phase, "scheduler killed": sch_phase,
              "control plane away": away, "scheduler back": resumed}
    for name, rs in phases.items():
        failed = [r.status for r in rs if r.status != 200]
        assert not failed, f"{name}: {failed}"
    base = hit_rate(before)
    assert base > 0.5, f"warm traffic should mostly hit the cache: {base:.2f}"
    for name in ("indexer killed", "scheduler killed", "scheduler back"):
        assert abs(hit_rate(phases[name]) - base) <= 0.05, (name, hit_rate(phases[name]), base)
    # Away: every request fell back to load routing (tokenize still worked), none failed.
    assert fallbacks_away - fallbacks_before >= len(away) - 1
    # Back: no more fallbacks once the new replica answered.
    assert fallbacks_after == fallbacks_away
    print("\nactive-active (requests sent / failed / hit rate / p50 / max latency ms):")
    for name, rs in phases.items():
        lats = sorted(r.latency for r in rs)
        print(f"  {name:<20} {len(rs):>3} / 0 / {hit_rate(rs):.3f} / "
              f"{1000 * lats[len(lats) // 2]:.0f} / {1000 * lats[-1]:.0f}")
    print(f"  scheduler back: ready {1000 * (t_ready - t_back):.0f} ms after start; "
          f"fallbacks while away {fallbacks_away - fallbacks_before:.0f}")
