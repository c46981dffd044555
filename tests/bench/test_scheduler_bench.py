"""Benchmark: scheduler decision latency over the bus, 8 and 64 pods, 512-block prompts.

(``BENCH_SCHEDULER_BLOCKS=6250`` for 100k-token prompts, ``BENCH_SCHEDULER_REQUESTS`` for the
number of requests per figure.)

Not a test of speed (nothing is asserted about time): it prints p50 and p99 of one
``im.schedule`` round trip per profile, next to baselines measured in the same process on the
same nats-server: an echo service (decode a ScheduleRequest, answer a fixed decision: what a
scheduler that did no work would cost) and one round trip to the stub indexer (the part of the
precise path that an indexer replica, not the scheduler, spends).

The scheduler, the stub indexer (fixed matches: a quarter of the pods hold part of the prompt)
and the client share one event loop, so every figure includes the client's own cost; compare
figures with each other, not with a scheduler measured alone.

Run with `make bench` (or `pytest -m bench -s tests/bench/test_scheduler_bench.py`).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from infermesh.libs.bus import BusService, NatsServer, connect, request
from infermesh.proto import codec
from infermesh.proto.messages import (
    LookupReply,
    LookupRequest,
    PodMatch,
    PodState,
    ScheduleDecision,
    ScheduleRequest,
)
from infermesh.services.scheduler.config import SchedulerConfig
from infermesh.services.scheduler.service import SchedulerService

pytestmark = pytest.mark.bench

REQUESTS = int(os.environ.get("BENCH_SCHEDULER_REQUESTS", "1000"))
WARMUP = 100
BLOCKS = int(os.environ.get("BENCH_SCHEDULER_BLOCKS", "512"))  # 6250: a 100k-token prompt
MODEL = "bench-model"
PROFILES = ["default", "precise-prefix", "approx-prefix", "load", "round-robin", "random"]


def prompts(rng: random.Random, n: int) -> list[list[int]]:
    """Prompts in 16 families that share their first 3/4 (system prompts, documents)."""
    shared = BLOCKS * 3 // 4
    families = [[rng.getrandbits(64) for _ in range(shared)] for _ in range(16)]
    return [
        families[i % 16] + [rng.getrandbits(64) for _ in range(BLOCKS - shared)]
        for i in range(n)
    ]


def pod_states(n: int) -> list[PodState]:
    rng = random.Random(n)
    return [
        PodState(pod=f"pod-{i:02d}", pool="default", model=MODEL, url=f"http://10.0.0.{i}:8000",
                 ts=0.0, epoch="e", kv_seq=0, waiting=rng.randrange(0, 8),
                 running=rng.randrange(0, 32), kv_usage=rng.random())
        for i in range(n)
    ]


def stub_matches(states: list[PodState]) -> list[PodMatch]:
    rng = random.Random(len(states))
    held = states[: max(1, len(states) // 4)]
    out = []
    for st in held:
        blocks = rng.randrange(1, BLOCKS + 1)
        tiers = ["GPU"] * (blocks * 3 // 4) + ["CPU"] * (blocks - blocks * 3 // 4)
        out.append(PodMatch(pod=st.pod, blocks=blocks, tiers=tiers))
    return out


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


async def measure(call: Callable[[int], Awaitable[Any]], n: int) -> list[float]:
    for i in range(WARMUP):
        await call(i)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await call(WARMUP + i)
        out.append(time.perf_counter() - t0)
    return out


async def run_pods(srv: NatsServer, npods: int) -> dict[str, list[float]]:
    states = pod_states(npods)
    matches = stub_matches(states)
    names = {st.pod for st in states}
    sched_nc = await connect(srv.url, "bench-scheduler")
    side_nc = await connect(srv.url, "bench-side")  # stub indexer, echo, heartbeats
    client = await connect(srv.url, "bench-client")

    async def lookup(msg: LookupRequest) -> LookupReply:
        wanted = set(msg.pods) if msg.pods is not None else names
        return LookupReply(matches=[m for m in matches if m.pod in wanted])

    fixed = ScheduleDecision(request_id="", pod="pod-00", url="http://10.0.0.0:8000",
                             profile="echo")

    async def echo(msg: ScheduleRequest) -> ScheduleDecision:
        return fixed

    side = BusService(side_nc, "bench-side")
    side.endpoint("lookup", "im.index.lookup", LookupRequest, lookup, queue_group="indexer")
    side.endpoint("echo", "bench.echo", ScheduleRequest, echo)
    await side.start()

    async def heartbeats() -> None:
        while True:
            for st in states:
                await side_nc.publish(f"im.pod.default.{st.pod}", codec.encode(st))
            await asyncio.sleep(0.1)

    beat = asyncio.create_task(heartbeats())
    svc = SchedulerService(SchedulerConfig(http_port=-1, warmup_s=0.3, seed=1), nc=sched_nc)
    await svc.start()
    while len(svc.pods) < npods:
        await asyncio.sleep(0.01)

    rng = random.Random(42)
    total = WARMUP + REQUESTS
    keys = prompts(rng, total)
    reqs = [
        ScheduleRequest(request_id=f"r{i}", model=MODEL, num_tokens=BLOCKS * 16,
                        block_keys=keys[i])
        for i in range(total)
    ]
    results: dict[str, list[float]] = {}
    try:
        results["echo (baseline)"] = await measure(
            lambda i: request(client, "bench.echo", reqs[i], ScheduleDecision), REQUESTS)
        lk = [LookupRequest(model=MODEL, block_keys=k, pods=sorted(names)) for k in keys]
        results["indexer stub (baseline)"] = await measure(
            lambda i: request(client, "im.index.lookup", lk[i], LookupReply), REQUESTS)
        for profile in PROFILES:
            prs = [
                ScheduleRequest(request_id=f"{profile}-{i}", model=MODEL, num_tokens=BLOCKS * 16,
                                block_keys=keys[i], profile=profile)
                for i in range(total)
            ]

            def call(i: int, prs: list[ScheduleRequest] = prs) -> Awaitable[ScheduleDecision]:
                return request(client, "im.schedule", prs[i], ScheduleDecision)

            results[profile] = await measure(call, REQUESTS)
        assert svc.metrics.index_lookups.labels("precise-prefix", "ok")._value.get() > 0
        assert svc.handle.metrics.rejections._metrics == {}
    finally:
        beat.cancel()
        await svc.stop()
        await side.stop()
        for nc in (client, side_nc, sched_nc):
            await nc.close()
    return results


@pytest.mark.parametrize("npods", [8, 64])
def test_scheduler_decision_latency(npods: int) -> None:
    with NatsServer(max_payload=8 * 1024 * 1024) as srv:
        results = asyncio.run(run_pods(srv, npods))
    print(f"\nscheduler decision latency, {npods} pods, {BLOCKS}-block prompts, "
          f"{REQUESTS} requests each (µs)")
    print(f"{'':26s} {'p50':>8s} {'p99':>8s} {'mean':>8s}")
    for name, samples in results.items():
        us = [s * 1e6 for s in samples]
        print(f"{name:26s} {pct(us, 0.5):8.0f} {pct(us, 0.99):8.0f} {statistics.mean(us):8.0f}")
