"""Flow control in the ingress: a saturated pool queues requests in the router, serves them by
priority band and then fairly between tenants, sheds sheddable ones, and answers 429 / 503 as
documented — never a 500, and every request gets an answer."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from aiohttp import web

from .helpers import wait_until
from .test_ingress import MODEL, FakeEngine, World, _metrics
from .test_ingress import world as world  # noqa: F401 - the fixture


class GatedEngine(FakeEngine):
    """Answers nothing until ``gate`` is set; records prompts in arrival order."""

    def __init__(self) -> None:
        super().__init__("ok")
        self.gate = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.prompts.append((await request.json()).get("prompt"))
        await self.gate.wait()
        return web.json_response({"choices": [{"text": "hi"}], "usage": {
            "prompt_tokens": 3, "completion_tokens": 1}})


async def send(url: str, prompt: str, headers: dict[str, str] | None = None,
               **body: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(
            url + "/v1/completions", json={"model": MODEL, "prompt": prompt, **body},
            headers=headers or {}) as r:
        return r.status, dict(r.headers), json.loads(await r.read())


# One request in flight per engine saturates it; the other signals are off, so the test decides
# exactly when the pool has room.
SATURATE_AT_ONE = {"saturation_requests": 1, "saturation_waiting": 0, "saturation_kv_usage": 0.0,
                   "saturation_uncached_tokens": 0}


async def start_gated(world: World, **cfg: Any) -> GatedEngine:
    engine = GatedEngine()
    await engine.start()
    world.engines["a"] = engine
    await world.start({}, **{**SATURATE_AT_ONE, **cfg})
    await wait_until(lambda: len(world.ingress.live_pods()) == 1, what="the engine")
    return engine


async def test_a_saturated_pool_queues_by_priority_then_tenant_and_sheds(world) -> None:
    engine = await start_gated(world, flow_fairness="requests", hold_max_requests=5)
    url, flow = world.url, world.ingress.flow
    first = asyncio.create_task(send(url, "A"))
    await wait_until(lambda: engine.hits == 1, what="A at the engine")
    assert flow.saturated() == "requests"

    # Sheddable (negative priority) while saturated: refused at once, nothing queued.
    status, headers, body = await send(url, "shed", {"x-infermesh-priority": "-1"})
    assert status == 429 and "sheddable" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1 and len(flow) == 0

    tasks: dict[str, asyncio.Task[Any]] = {}

    async def queue(name: str, headers: dict[str, str], **body: Any) -> None:
        n = len(flow)
        tasks[name] = asyncio.create_task(send(url, name, headers, **body))
        await wait_until(lambda: len(flow) == n + 1, what=f"{name} queued")

    for name in ("x1", "x2", "x3"):
        await queue(name, {"x-infermesh-tenant": "x"})
    await queue("y1", {"x-infermesh-tenant": "y"})
    # vLLM's own `priority` field (lower is earlier there) is a higher band here.
    await queue("p2", {"x-infermesh-tenant": "y"}, priority=-2)
    # Full (5): another of x's, the tenant with the most waiting, is refused ...
    status, headers, body = await send(url, "x4", {"x-infermesh-tenant": "x"})
    assert status == 429 and "waiting for room" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    # ... a newcomer of another tenant takes the place of x's newest (x3: 429) ...
    tasks["z1"] = asyncio.create_task(send(url, "z1", {"x-infermesh-tenant": "z"}))
    status, _, body = await tasks.pop("x3")
    assert status == 429 and "took this one's place" in body["error"]["message"]
    await wait_until(lambda: len(flow) == 5, what="z1 queued")
    # ... and the header's band beats the body's.
    tasks["h5"] = asyncio.create_task(send(url, "h5", {"x-infermesh-tenant": "x",
                                                       "x-infermesh-priority": "5"}))
    status, _, body = await tasks.pop("x2")  # x's newest band-0 request left for it
    assert status == 429

    engine.gate.set()  # room, one request at a time
    assert (await first)[0] == 200
    results = {name: await t for name, t in tasks.items()}
    assert {name: r[0] for name, r in results.items()} == dict.fromkeys(results, 200)
    # Bands first (5, then 2, then 0), then turns between the tenants of band 0, the one
    # that came to the queue last (with nothing waiting) first.
    assert engine.prompts == ["A", "h5", "p2", "z1", "y1", "x1"]
    text = await _metrics(url)
    for line in ('infermesh_ingress_flow_requests_total{band="-1",outcome="shed",tenant="default"} '
                 "1.0",
                 'infermesh_ingress_flow_requests_total{band="0",outcome="displaced",tenant="x"} '
                 "2.0",
                 'infermesh_ingress_flow_requests_total{band="0",outcome="full",tenant="x"} 1.0',
                 'infermesh_ingress_flow_requests_total{band="0",outcome="admitted",tenant="y"} '
                 "1.0",
                 'infermesh_ingress_flow_wait_seconds_count{band="5",tenant="x"} 1.0',
                 'infermesh_ingress_flow_queued{band="0",tenant="x"} 0.0'):
        assert line in text, line
    # The waits are not "held" (that is the wait for an engine to start): the SLO counts them.
    await wait_until(lambda: sum(e.kind == "finished" for e in world.events) == 6,
                     what="the finished events")
    assert all(e.held_s == 0.0 for e in world.events)


async def test_no_room_in_time_is_a_503_and_the_pool_serves_on(world) -> None:
    engine = await start_gated(world, queue_timeout_s=0.5)
    first = asyncio.create_task(send(world.url, "A"))
    await wait_until(lambda: engine.hits == 1, what="A at the engine")
    t0 = time.monotonic()
    status, _, body = await send(world.url, "B", stream=True)
    assert status == 503 and time.monotonic() - t0 >= 0.5
    assert "saturated" in body["error"]["message"] and body["error"]["code"] == 503
    assert len(world.ingress.flow) == 0
    engine.gate.set()
    assert (await first)[0] == 200
    assert (await send(world.url, "C"))[0] == 200  # room again: straight through
    text = await _metrics(world.url)
    assert ('infermesh_ingress_flow_requests_total{band="0",outcome="timed_out",'
            'tenant="default"} 1.0') in text
    assert ('infermesh_ingress_flow_requests_total{band="0",outcome="direct",'
            'tenant="default"} 2.0') in text
    assert engine.prompts == ["A", "C"]


async def test_a_client_that_leaves_while_queued_frees_its_place(world) -> None:
    engine = await start_gated(world)
    first = asyncio.create_task(send(world.url, "A"))
    await wait_until(lambda: engine.hits == 1, what="A at the engine")
    gone = asyncio.create_task(send(world.url, "gone"))
    await wait_until(lambda: len(world.ingress.flow) == 1, what="queued")
    gone.cancel()
    await wait_until(lambda: len(world.ingress.flow) == 0, what="its place freed")
    stays = asyncio.create_task(send(world.url, "stays"))
    await wait_until(lambda: len(world.ingress.flow) == 1, what="queued")
    engine.gate.set()
    assert (await first)[0] == 200 and (await stays)[0] == 200
    assert engine.prompts == ["A", "stays"]
    assert 'outcome="gone"' in await _metrics(world.url)


async def test_bad_flow_headers_are_400s(world) -> None:
    await world.start({"a": "ok"})
    for headers in ({"x-infermesh-priority": "high"}, {"x-infermesh-priority": "1e9"},
                    {"x-infermesh-tenant": "a b"}, {"x-infermesh-deadline-ms": "-5"},
                    {"x-infermesh-deadline-ms": "soon"}):
        status, _, body = await send(world.url, "x", headers)
        assert status == 400 and body["error"]["code"] == 400, headers
    assert (await send(world.url, "x", {"x-infermesh-priority": "3",
                                        "x-infermesh-tenant": "team-a",
                                        "x-infermesh-deadline-ms": "250"}))[0] == 200


async def test_with_flow_control_off_a_saturated_pool_is_sent_everything(world) -> None:
    engine = await start_gated(world, flow_control=False)
    tasks = [asyncio.create_task(send(world.url, f"p{i}")) for i in range(3)]
    await wait_until(lambda: engine.hits == 3, what="all three at the engine")
    assert len(world.ingress.flow) == 0
    engine.gate.set()
    assert [(await t)[0] for t in tasks] == [200] * 3


async def test_the_session_goes_to_the_scheduler_and_on_the_routed_event(world) -> None:
    """The session-affinity scorer's input: the conversation from the header (else the
    cookie) on the ScheduleRequest, and on the routed event every replica learns it from (the
    ingress publishes it when the scheduler did not: two trips)."""
    await world.start({"a": "ok"}, chained_routing=False)
    assert (await send(world.url, "t1", {"x-session-id": "conv-7"}))[0] == 200
    assert world.schedule_calls[-1].session_id == "conv-7"
    assert (await send(world.url, "t2", {"Cookie": "infermesh-session=conv-8"}))[0] == 200
    assert world.schedule_calls[-1].session_id == "conv-8"
    assert (await send(world.url, "t3"))[0] == 200
    assert world.schedule_calls[-1].session_id is None
    await wait_until(lambda: sum(e.kind == "routed" for e in world.events) >= 3, what="routed")
    assert [e.session for e in world.events if e.kind == "routed"][:3] == ["conv-7", "conv-8", ""]
    status, _, body = await send(world.url, "t4", {"x-session-id": "x" * 300})
    assert status == 400 and "session" in body["error"]["message"]


async def test_uncached_tokens_in_flight_saturate_the_pool(world) -> None:
    """The signal from request events: with the ingress deciding here, a prompt's tokens
    routed to the only engine and not yet prefilled saturate it; the next request waits until
    that prefill ends (its first token), whatever the engine's heartbeat says."""
    engine = GatedEngine()
    await engine.start()
    world.engines["a"] = engine
    await world.start({}, schedule_here=True, saturation_requests=0, saturation_waiting=0,
                      saturation_kv_usage=0.0, saturation_uncached_tokens=40)
    flow = world.ingress.flow
    first = asyncio.create_task(send(world.url, "A" * 50))  # 50 tokens (the stub tokenizer)
    await wait_until(lambda: engine.hits == 1, what="A at the engine")
    await wait_until(lambda: flow.saturated() == "uncached_tokens", what="saturated by A")
    second = asyncio.create_task(send(world.url, "B" * 10))
    await wait_until(lambda: len(flow) == 1, what="B waiting")
    engine.gate.set()
    assert (await first)[0] == 200 and (await second)[0] == 200
    assert engine.prompts == ["A" * 50, "B" * 10]


async def test_a_request_let_go_for_room_goes_where_the_room_is(world) -> None:
    """Both engines saturated (a: a request in flight; b: its heartbeat says it queues), a
    request waits; b's queue empties: it is let go, and its decision leaves out a, still
    saturated, though the (stub) scheduler would pick a first."""
    a, b = GatedEngine(), GatedEngine()
    for name, e in (("a", a), ("b", b)):
        await e.start()
        world.engines[name] = e
    world.waiting["b"] = 10
    await world.start({}, **{**SATURATE_AT_ONE, "saturation_waiting": 5})
    first = asyncio.create_task(send(world.url, "A"))
    await wait_until(lambda: a.hits == 1, what="A at a")
    await wait_until(lambda: world.ingress.flow.saturated() is not None, what="saturated")
    second = asyncio.create_task(send(world.url, "B"))
    await wait_until(lambda: len(world.ingress.flow) == 1, what="B waiting")
    world.waiting["b"] = 0  # the next heartbeat: b has room
    await wait_until(lambda: b.hits == 1, what="B at b")
    a.gate.set()
    b.gate.set()
    assert (await first)[0] == 200 and (await second)[0] == 200
    assert world.schedule_calls[-1].exclude == ["a"] and b.prompts == ["B"]
