"""The fleet console as a real process on a real nats-server, fed heartbeats of pods that do
not exist, request events, autoscaler decisions, an ingress's demand and garbage: its state and
its event stream show them, bad queries are 400s, and garbage is counted, never fatal."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from infermesh.libs.bus import NatsServer, connect
from infermesh.libs.process.ports import free_port
from infermesh.libs.process.ready import wait_ready_file
from infermesh.proto import codec
from infermesh.proto.messages import PodState, RequestEvent, ScaleDecision, ScaleDemand

from ..conftest import ProcessManager
from .helpers import wait_until

MODEL = "infermesh/tiny-llama"


def beat(pod: str, **kw: Any) -> bytes:
    return codec.encode(PodState(pod=pod, pool="default", model=MODEL, url=f"http://{pod}.test",
                                 ts=time.time(), epoch="e1", kv_seq=0, num_gpu_blocks=400,
                                 **kw))


def routed(rid: str, pod: str, **kw: Any) -> bytes:
    return codec.encode(RequestEvent(kind="routed", request_id=rid, pod=pod, pool="default",
                                     model=MODEL, ts=time.time(), **kw))


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Any]:
    nc = await connect(nats_server.url, "test")
    yield nc
    await nc.close()


async def read_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The snapshots of a server-sent event stream, as they come."""
    data = b""
    async for line in resp.content:
        if line.startswith(b"data: "):
            data += line[6:].rstrip(b"\n")
        elif line == b"\n" and data:
            yield json.loads(data)
            data = b""


async def test_state_events_queries_and_garbage(procs: ProcessManager, nats_server: NatsServer,
                                                bus: Any) -> None:
    port = free_port()
    ready = procs.tmp / "console-ready.json"
    p = procs.service("console", "--nats-url", nats_server.url, "--http-port", str(port),
                      "--updates-per-s", "10", "--max-clients", "2", "--decisions", "5",
                      "--ready-file", str(ready))
    assert wait_ready_file(ready, 30, [p]).detail["console_url"].endswith(f":{port}/console")
    base = f"http://127.0.0.1:{port}"

    async def pump() -> None:  # heartbeats of two pods every 100 ms, as agents send them
        while True:
            await bus.publish("im.pod.default.sim-0", beat("sim-0", kv_usage=0.5, running=2))
            await bus.publish("im.pod.default.sim-1", beat("sim-1", role="decode", waiting=3))
            await asyncio.sleep(0.1)

    heartbeats = asyncio.create_task(pump())
    try:
        async with aiohttp.ClientSession() as http:

            async def state(query: str = "") -> dict[str, Any]:
                async with http.get(f"{base}/console/state{query}") as r:
                    assert r.status == 200
                    return await r.json()  # type: ignore[no-any-return]

            async def two_pods() -> bool:
                return len((await state())["pods"]) == 2

            await wait_until(two_pods, 20, "both pods on the console")
            pods = {x["pod"]: x for x in (await state())["pods"]}
            assert pods["sim-0"]["kv_usage"] == 0.5 and pods["sim-0"]["blocks_used"] == 200
            assert pods["sim-1"]["role"] == "decode" and pods["sim-1"]["waiting"] == 3

            # Garbage on every subject it reads: counted, dropped, the console goes on.
            for subject in ("im.pod.default.sim-9", "im.req.default", "im.scale.default"):
                await bus.publish(subject, b"\xc1not msgpack")
            await bus.publish("im.pod.x.y", beat("bad pod name"))
            await bus.publish("im.req.default", codec.encode(RequestEvent(
                kind="routed", request_id="r", pod="p", pool="no.pool", model="m", ts=0.0)))

            # A browser follows: the whole snapshot first, then a routed request.
            async with http.get(f"{base}/console/events") as events:
                assert events.status == 200
                assert events.headers["Content-Type"] == "text/event-stream"
                stream = read_events(events)
                first = await anext(stream)
                assert {x["pod"] for x in first["pods"]} == {"sim-0", "sim-1"}
                await bus.publish("im.req.default", routed(
                    "req-1", "sim-1", num_tokens=80, block_keys=[11, 12], profile="default",
                    scores={"sim-0": 1.25, "sim-1": 2.5}, cached_blocks=1))
                async with asyncio.timeout(10):
                    async for snap in stream:
                        if snap["decisions"]:
                            break
                (d,) = snap["decisions"]
                assert (d["request_id"], d["pod"], d["profile"]) == ("req-1", "sim-1", "default")
                assert d["scores"] == [["sim-1", 2.5], ["sim-0", 1.25]] and d["status"] == ""
                # Its outcome updates the same row.
                await bus.publish("im.req.default", codec.encode(RequestEvent(
                    kind="finished", request_id="req-1", pod="sim-1", pool="default",
                    model=MODEL, ts=time.time(), ttft_s=0.05, output_tokens=4)))
                async with asyncio.timeout(10):
                    async for snap in stream:
                        if snap["decisions"][0]["status"] == "ok":
                            break
                assert snap["decisions"][0]["ttft_s"] == 0.05
                assert snap["totals"]["routed"] == 1 and snap["totals"]["finished"] == 1
                # Two streams at most (--max-clients 2): the third is refused, in OpenAI form.
                async with http.get(f"{base}/console/events?pool=default&decisions=1") as two:
                    assert two.status == 200
                    async with http.get(f"{base}/console/events") as three:
                        assert three.status == 503
                        assert (await three.json())["error"]["code"] == 503

            # The autoscaler's decision and an ingress's demand.
            await bus.publish("im.scale.default", codec.encode(ScaleDecision(
                pool="default", model=MODEL, ts=time.time(), target_replicas=3,
                ready_replicas=2, recommended=3, reason="saturated", mode="saturation",
                replica="as-0")))
            await bus.publish("im.scale.cold", codec.encode(ScaleDemand(
                pool="cold", model=MODEL, ts=time.time(), queued=2, replica="ingress-0")))

            async def scaled() -> bool:
                a = (await state())["autoscaler"]
                return "default" in a and "cold" in a

            await wait_until(scaled, 10, "the autoscaler's decision and the demand")
            a = (await state())["autoscaler"]
            assert a["default"]["decision"]["target_replicas"] == 3 and a["cold"]["held"] == 2
            only = await state("?pool=cold&decisions=0")
            assert only["pods"] == [] and only["decisions"] == [] and list(only["autoscaler"]) \
                == ["cold"]
            # The ring keeps the latest --decisions 5.
            for i in range(8):
                await bus.publish("im.req.default", routed(f"more-{i}", "sim-0"))
            await wait_until(lambda: _routed_at_least(state, 9), 10, "every routed event")
            assert [r["request_id"] for r in (await state())["decisions"]] == \
                [f"more-{i}" for i in range(7, 2, -1)]

            # Bad queries: OpenAI-style 400s naming the parameter.
            for query, param in (("?pool=a.b", "pool"), ("?decisions=99", "decisions"),
                                 ("?decisions=x", "decisions"), ("?since=3", "since")):
                for path in ("/console/state", "/console/events", "/console"):
                    async with http.get(base + path + query) as r:
                        assert r.status == 400, (path, query)
                        err = (await r.json())["error"]
                        assert err["param"] == param and err["type"] == "invalid_request_error"

            # The page: one file, nothing fetched from elsewhere.
            async with http.get(base + "/") as r:
                assert r.status == 200 and r.url.path == "/console"
                page = await r.text()
            assert "<script>" in page and "/console/events" in page
            assert "src=" not in page and "<link" not in page and "https://" not in page
            async with http.get(base + "/health") as r:
                assert r.status == 200 and (await r.json())["pods"] == 2
            async with http.get(base + "/metrics") as r:
                metrics = await r.text()
    finally:
        heartbeats.cancel()
    for kind in ("pod_state", "request_event", "scale"):
        assert f'infermesh_console_bus_messages_total{{kind="{kind}",outcome="bad"}}' in metrics
    assert 'infermesh_console_bus_messages_total{kind="pod_state",outcome="bad"} 2.0' in metrics
    assert "infermesh_console_updates_total" in metrics
    assert p.alive()


async def _routed_at_least(state: Any, n: int) -> bool:
    return bool((await state())["totals"]["routed"] >= n)
