"""A slow engine is not a dead one: while the engine's /metrics stalls (a big prompt blocks it),
the agent's heartbeats keep coming with the last known load and ready=True, for
``--engine-unresponsive-s``; after that they say ready=False. A refused port says it at once.

The engine is a stub in the test's own event loop whose /metrics handler waits on an event the
test controls, so "stalled" and "answering again" are exact.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web

from infermesh.libs.bus import connect
from infermesh.libs.process.ports import free_port_range
from infermesh.proto import codec
from infermesh.proto.messages import PodState
from infermesh.services.system.plan import command

from .helpers import wait_until

GRACE_S = 3.0
MODEL = "stub-model"
METRICS = f"""# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 1.0
"""


class StubEngine:
    """/v1/models and /metrics of an engine; /metrics hangs while ``stalled``."""

    def __init__(self) -> None:
        self.stalled = False
        self.release = asyncio.Event()
        self.stalled_calls = 0
        self.last_answer: float | None = None  # monotonic time /metrics last answered
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> StubEngine:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def stall(self) -> None:
        self.release.clear()
        self.stalled = True

    def answer(self) -> None:
        self.stalled = False
        self.release.set()

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": MODEL, "object": "model", "max_model_len": 4096}]})

    async def _metrics(self, _: web.Request) -> web.Response:
        if self.stalled:
            self.stalled_calls += 1
            await self.release.wait()
        self.last_answer = time.monotonic()
        return web.Response(text=METRICS, content_type="text/plain")


async def test_heartbeat_stays_ready_while_metrics_stall_then_says_not_ready(
        nats_server, procs):
    stub = await StubEngine().start()
    beats: list[tuple[float, PodState]] = []

    async def on_pod(msg: Any) -> None:
        beats.append((time.monotonic(), codec.decode(msg.data, PodState)))

    nc = await connect(nats_server.url, "test")
    await nc.subscribe("im.pod.*.pod-s", cb=on_pod)
    await nc.flush()
    try:
        # No KV stream (a port nobody listens on, no replay socket): only the load matters.
        eng = {"http": stub.url, "kv": f"tcp://127.0.0.1:{free_port_range(1)}", "replay": ""}
        procs.agent(nats_server.url, eng, "pod-s", "--scrape-timeout-s", "0.3",
                    "--engine-unresponsive-s", str(GRACE_S))
        await wait_until(lambda: bool(beats) and beats[-1][1].ready, what="ready heartbeat")
        assert beats[-1][1].running == 3 and beats[-1][1].waiting == 1

        stub.stall()
        t_stall = time.monotonic()
        # Scrapes run one after the other: a second stalled one means the first timed out.
        await wait_until(lambda: stub.stalled_calls >= 2
                         and sum(1 for t, _ in beats if t > t_stall) >= 5,
                         what="scrapes timing out, heartbeats going on")
        assert stub.last_answer is not None
        deadline = stub.last_answer + GRACE_S  # the agent's grace starts after this answer
        assert time.monotonic() < deadline, "the stall went on past the grace already"
        during = [st for t, st in beats if t_stall < t < deadline]
        assert len(during) >= 3, "heartbeats stopped while /metrics stalled"
        assert all(st.ready and st.running == 3 for st in during), [
            (st.ready, st.running) for st in during]

        await wait_until(lambda: not beats[-1][1].ready, timeout=GRACE_S + 15,
                         what="ready=False once the grace is over")
        t_not_ready = beats[-1][0]
        assert t_not_ready >= deadline
        before = [st for t, st in beats if t_stall < t < t_not_ready]
        assert all(st.ready for st in before)
        # The heartbeat kept going meanwhile (every 0.2 s; a third of that is plenty on a busy box).
        assert len(before) >= GRACE_S / 0.2 / 3, len(before)

        stub.answer()
        await wait_until(lambda: beats[-1][1].ready, what="ready again once it answers")

        # A refused port is a dead engine: ready=False well within the grace.
        await stub.stop()
        t_gone = time.monotonic()
        await wait_until(lambda: not beats[-1][1].ready, timeout=GRACE_S + 15,
                         what="ready=False once the port refuses")
        assert beats[-1][0] - t_gone < GRACE_S - 0.5
    finally:
        await nc.close()
        await stub.stop()


async def test_drain_takes_the_pod_out_of_routing_and_keeps_reporting_its_load(
        nats_server, procs):
    """POST /drain: the heartbeats say ready=False with the label draining, and go on carrying
    the engine's running and waiting counts (what says when it is idle)."""
    stub = await StubEngine().start()
    beats: list[PodState] = []

    async def on_pod(msg: Any) -> None:
        beats.append(codec.decode(msg.data, PodState))

    nc = await connect(nats_server.url, "test")
    await nc.subscribe("im.pod.*.pod-d", cb=on_pod)
    await nc.flush()
    port = free_port_range(1)
    try:
        eng = {"http": stub.url, "kv": f"tcp://127.0.0.1:{free_port_range(1)}", "replay": ""}
        agent = procs.start("agent-pod-d", [
            *command("agent"), "--nats-url", nats_server.url, "--pod", "pod-d",
            "--engine-url", eng["http"], "--kv-endpoint", eng["kv"], "--http-port", str(port),
            "--labels", "zone=a"])
        await wait_until(lambda: bool(beats) and beats[-1].ready, what="ready heartbeat")
        assert "draining" not in beats[-1].labels
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/drain") as r:
                assert r.status == 200
                body = await r.json()
            assert body["draining"] is True and body["running"] == 3
            n = len(beats)
            await wait_until(lambda: len(beats) >= n + 3, what="heartbeats after the drain")
            after = beats[n:]
            assert all(not b.ready and b.labels == {"zone": "a", "draining": "true"}
                       and b.running == 3 and b.waiting == 1 for b in after)
            async with http.get(f"http://127.0.0.1:{port}/health") as r:
                assert (await r.json())["draining"] is True
            async with http.post(f"http://127.0.0.1:{port}/drain") as r:  # idempotent
                assert r.status == 200
            # Undrain: ready again, the label gone, at once (not at the next beat only).
            async with http.post(f"http://127.0.0.1:{port}/undrain") as r:
                assert r.status == 200 and (await r.json())["draining"] is False
            n = len(beats)
            await wait_until(lambda: len(beats) >= n + 2, what="heartbeats after the undrain")
            assert all(b.ready and b.labels == {"zone": "a"} for b in beats[-2:])
        assert agent.alive()
    finally:
        await nc.close()
        await stub.stop()
