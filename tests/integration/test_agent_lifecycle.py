"""An engine's life as its agent tells it: one AllBlocksCleared per engine process (however long
it idles), and a quiet wait for an engine that is not up yet.

Real simulator and agent processes on a real nats-server; "nothing more happened" is asserted
only after a positive signal that the agent looked (its replay counter moved) and that the bus
delivered everything it published before (a heartbeat sent after that).
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from infermesh.libs.bus import connect
from infermesh.libs.process.ports import free_port_range
from infermesh.proto.messages import AllBlocksCleared, KVEventBatch

from .helpers import (
    SIM_BLOCK_SIZE,
    BusWatcher,
    KVStreamView,
    complete_ids,
    random_prompt,
    sim_cache,
    wait_until,
)

BS = SIM_BLOCK_SIZE


def engine_ports() -> tuple[int, int, int]:
    """Ports for an engine's HTTP server and KV socket (its replay socket on the next port), and
    one for the agent's /metrics: all different, though none is bound yet."""
    kv = free_port_range(2)
    taken = {kv, kv + 1}
    http = free_port_range(1)
    while http in taken:
        http = free_port_range(1)
    taken.add(http)
    ops = free_port_range(1)
    while ops in taken:
        ops = free_port_range(1)
    return http, kv, ops


class AgentOps:
    """The agent's own /metrics."""

    def __init__(self, http: aiohttp.ClientSession, port: int) -> None:
        self.http = http
        self.url = f"http://127.0.0.1:{port}/metrics"

    async def value(self, name: str, **labels: str) -> float:
        """A sample's value (0 when the agent does not answer yet or has no such sample)."""
        try:
            async with self.http.get(self.url) as r:
                text = await r.text()
        except aiohttp.ClientError:
            return 0.0
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    async def replays(self, outcome: str = "ok") -> float:
        return await self.value("infermesh_agent_replays_total", outcome=outcome)

    async def rebuilds(self) -> float:
        return await self.value("infermesh_agent_rebuilds_total")

    async def restarts(self) -> float:
        return await self.value("infermesh_agent_engine_restarts_total")


async def idle_checks(ops: AgentOps, watch: BusWatcher, pod: str, n: int) -> None:
    """Wait until the agent asked the replay socket ``n`` more times, and for a heartbeat sent
    after that: every batch published before it has then reached ``watch`` (one connection,
    in order)."""
    start = await ops.replays()

    async def looked() -> bool:
        return await ops.replays() >= start + n

    await wait_until(looked, what=f"{n} idle checks")
    t = time.time()
    await wait_until(lambda: watch.states[pod].ts > t, what="a heartbeat after the idle checks")


def cleared_batches(view: KVStreamView) -> list[KVEventBatch]:
    return [b for b in view.batches if any(isinstance(e, AllBlocksCleared) for e in b.events)]


async def test_one_clear_per_engine_process_however_long_it_idles(nats_server, procs):
    http_port, kv_port, ops_port = engine_ports()
    args = ("--time-scale", "0", "--http-port", str(http_port), "--kv-port", str(kv_port))
    sim, info = procs.sim(*args)
    eng = info["engines"][0]
    nc = await connect(nats_server.url, "test")
    watch = await BusWatcher(nc).start()
    procs.agent(nats_server.url, eng, "pod-q", "--idle-check-s", "0.1",
                "--http-port", str(ops_port))
    view = watch.view("pod-q")
    async with aiohttp.ClientSession() as http:
        ops = AgentOps(http, ops_port)
        await wait_until(lambda: "pod-q" in watch.states and watch.states["pod-q"].ready,
                         what="first ready heartbeat")

        # A fresh engine that stays idle (empty replay buffer): one clear, not one per check.
        await idle_checks(ops, watch, "pod-q", 15)
        assert view.cleared == 1
        assert [b.engine_seq for b in cleared_batches(view)] == [None]
        assert await ops.rebuilds() == 1 and await ops.restarts() == 0

        # Killed and restarted on the same ports, no traffic on either: exactly one more.
        sim.kill()
        sim, _ = procs.sim(*args)

        async def rebuilt(n: int) -> bool:
            return await ops.rebuilds() >= n

        await wait_until(lambda: rebuilt(2), what="rebuild from the second engine")
        await idle_checks(ops, watch, "pod-q", 15)
        assert view.cleared == 2
        assert await ops.rebuilds() == 2 and await ops.restarts() == 1

        # Traffic, then a restart: one clear, and it names no engine seq of the old engine.
        rng = random.Random(12)
        for _ in range(5):
            await complete_ids(http, eng["http"], random_prompt(rng, 3 * BS + 1))
        cache = set((await sim_cache(http, eng["http"]))["GPU"])
        await wait_until(lambda: bool(cache) and view.gpu == cache, what="bus view of engine 2")
        old_seqs = {b.engine_seq for b in view.batches if b.engine_seq is not None}
        assert old_seqs
        sim.kill()
        sim, _ = procs.sim(*args)
        await wait_until(lambda: rebuilt(3), what="rebuild from the third engine")
        await idle_checks(ops, watch, "pod-q", 15)
        assert view.cleared == 3 and view.gpu == set()
        assert await ops.rebuilds() == 3 and await ops.restarts() == 2
        assert [b.engine_seq for b in cleared_batches(view)] == [None, None, None]

        # The new engine's traffic flows on top of that one clear.
        for _ in range(3):
            await complete_ids(http, eng["http"], random_prompt(rng, 3 * BS + 1))
        cache3 = set((await sim_cache(http, eng["http"]))["GPU"])
        await wait_until(lambda: view.gpu == cache3, what="bus view of engine 3")
        assert not (cache3 & cache) and view.cleared == 3
    (epoch,) = view.epochs()
    assert view.seqs(epoch) == list(range(1, len(view.batches) + 1))
    await nc.close()


def _log_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


async def test_agent_waits_quietly_for_an_engine_that_is_not_up_yet(nats_server, procs):
    http_port, kv_port, ops_port = engine_ports()
    eng = {"http": f"http://127.0.0.1:{http_port}", "kv": f"tcp://127.0.0.1:{kv_port}",
           "replay": f"tcp://127.0.0.1:{kv_port + 1}"}
    nc = await connect(nats_server.url, "test")
    watch = await BusWatcher(nc).start()
    agent = procs.agent(nats_server.url, eng, "pod-w", "--idle-check-s", "0.1",
                        "--replay-timeout-s", "0.2", "--http-port", str(ops_port))
    async with aiohttp.ClientSession() as http:
        ops = AgentOps(http, ops_port)

        async def tried_and_failed() -> bool:
            return (await ops.replays("failed") >= 5
                    and await ops.value("infermesh_agent_scrape_errors_total") >= 5)

        await wait_until(tried_and_failed, what="the agent failing to reach its engine")
        assert agent.alive()
        procs.sim("--time-scale", "0", "--http-port", str(http_port), "--kv-port", str(kv_port))
        await wait_until(lambda: "pod-w" in watch.states and watch.states["pod-w"].ready,
                         what="ready heartbeat once the engine is up")
        await wait_until(lambda: "engine_ready" in agent.log.read_text(), what="engine_ready log")
        await idle_checks(ops, watch, "pod-w", 5)
    await nc.close()

    lines = _log_lines(agent.log.read_text())
    events = [ln["event"] for ln in lines]
    waiting = [ln for ln in lines if ln["event"] == "waiting_for_engine"]
    assert len(waiting) == 1, events
    assert waiting[0]["level"] == "info" and waiting[0]["url"] == eng["http"]
    ready_at = events.index("engine_ready")
    assert events.count("engine_ready") == 1
    assert lines[ready_at]["level"] == "info" and lines[ready_at]["waited_s"] > 0
    loud = [ln for ln in lines if ln["level"] not in ("debug", "info")]
    assert not loud, loud  # not while it waited, nor once the engine was up
    assert watch.view("pod-w").cleared == 1
