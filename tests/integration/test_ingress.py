"""The ingress against stub services and fake engines: retries before the first byte, fallbacks
when the control plane is away, request events, and clean 4xx answers to bad requests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from infermesh.libs.bus import BusService, Forward, NatsServer, connect
from infermesh.libs.kvblock import prompt_keys
from infermesh.libs.scheduling.state import PodTable
from infermesh.libs.tinymodel import ensure_model_folder
from infermesh.libs.tokenization import ModelTokenizer
from infermesh.proto import codec
from infermesh.proto.messages import (
    PodState,
    RequestEvent,
    RouteRequest,
    ScaleDemand,
    ScheduleDecision,
    ScheduleRequest,
    TokenizeReply,
    TokenizeRequest,
)
from infermesh.services.ingress.config import IngressConfig
from infermesh.services.ingress.service import IngressService

from ..conftest import ProcessManager
from ..stack import start_stack
from .helpers import wait_until

MODEL = "m"
SIM_MODEL = "infermesh/tiny-llama"


class FakeEngine:
    """An OpenAI-ish engine whose behaviour the test sets: ok, 503, or dying mid-stream."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.hits = 0
        self.prompts: list[Any] = []  # in arrival order
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> FakeEngine:
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_post("/v1/chat/completions", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore
        return self

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        body = await request.json()
        self.prompts.append(body.get("prompt"))
        if self.mode == "503":
            return web.json_response({"error": {"message": "busy", "type": "x", "code": 503}},
                                     status=503)
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b'data: {"choices":[{"text":"a"}]}\n\n')
            if self.mode == "die":
                # Drop the connection mid-stream, as a crashing engine would.
                assert request.transport is not None
                request.transport.close()
                return resp
            await resp.write(b'data: {"choices":[],"usage":{"prompt_tokens":3,'
                             b'"completion_tokens":1,"prompt_tokens_details":'
                             b'{"cached_tokens":2}}}\n\ndata: [DONE]\n\n')
            return resp
        return web.json_response({"choices": [{"text": "hi"}], "usage": {
            "prompt_tokens": 3, "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": 2}}})

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class World:
    """Fake engines with heartbeats, optional stub tokenizer and scheduler, and the ingress."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.engines: dict[str, FakeEngine] = {}
        self.events: list[RequestEvent] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.services: list[BusService] = []
        self.schedule_calls: list[ScheduleRequest] = []
        self.beating = True  # False: the heartbeats stop (a starved or paused agent)
        self.routes = 0  # im.route requests the stub tokenizer passed on
        self.exact_asks = 0  # tokenize requests asking for the exact count (token ids)
        self.tokenize_asks = 0  # im.tokenize requests the stub tokenizer answered
        self.waiting: dict[str, int] = {}  # requests an engine's heartbeat says it queues

    async def start(self, engines: dict[str, str], *, tokenizer: bool = True,
                    scheduler: bool = True, route_endpoint: bool = True,
                    **cfg: Any) -> IngressService:
        self.nc = await connect(self.nats_url, "world")
        for name, mode in engines.items():
            self.engines[name] = await FakeEngine(mode).start()
        self.tasks.append(asyncio.create_task(self._heartbeats()))

        async def on_event(msg: Any) -> None:
            self.events.append(codec.decode(msg.data, RequestEvent))

        await self.nc.subscribe("im.req.*", cb=on_event)
        if tokenizer:
            svc = BusService(self.nc, "stub-tokenizer")

            async def tokenize(req: TokenizeRequest) -> TokenizeReply:
                self.tokenize_asks += 1
                n = len(req.prompt) if isinstance(req.prompt, (str, list)) else 10
                if isinstance(req.prompt, str) and req.prompt.startswith("PARTIAL"):
                    # An early reply: the tail was never seen, the count is an estimate.
                    self.exact_asks += bool(req.return_token_ids)
                    if not req.return_token_ids:
                        return TokenizeReply(num_tokens=5000, block_keys=[1], partial=True,
                                             known_tokens=16, max_num_tokens=9000)
                    return TokenizeReply(num_tokens=n, block_keys=[1, 2], token_ids=[0] * n)
                return TokenizeReply(num_tokens=n, block_keys=[1, 2, 3])

            svc.endpoint("tokenize", "im.tokenize", TokenizeRequest, tokenize, "tokenizer")

            async def route(req: RouteRequest) -> Forward:
                # As the tokenizer does: tokenize, then pass the ScheduleRequest on.
                self.routes += 1
                t = await tokenize(req.tokenize)
                sched = msgspec.structs.replace(req.schedule, num_tokens=t.num_tokens,
                                                block_keys=t.block_keys,
                                                tokens_partial=t.partial)
                return Forward("im.schedule", sched)

            if route_endpoint:
                svc.endpoint("route", "im.route", RouteRequest, route, "tokenizer")
            await svc.start()
            self.services.append(svc)
        if scheduler:
            await self.start_scheduler()
        # The stub services decide unless a test asks for the ingress's own scheduler.
        cfg = {"tokenize_timeout_s": 0.3, "schedule_timeout_s": 0.3, "schedule_here": False,
               **cfg}
        self.ingress = IngressService(IngressConfig(nats_url=self.nats_url, http_port=0, **cfg))
        await self.ingress.start()
        await wait_until(lambda: len(self.ingress.live_pods()) == len(self.engines), what="pods")
        self.url = f"http://127.0.0.1:{self.ingress.http_port}"
        return self.ingress

    async def start_scheduler(self) -> None:
        """A stub scheduler: always the first pod by name that is not excluded."""
        svc = BusService(self.nc, "stub-scheduler")

        async def schedule(req: ScheduleRequest) -> ScheduleDecision:
            # Always the first pod by name that is not excluded: "a" before "b".
            self.schedule_calls.append(req)
            pod = sorted(p for p in self.engines if p not in req.exclude)[0]
            if req.announce:  # as the scheduler does for a RouteRequest's ingress
                await self.nc.publish(f"im.req.{req.pool}", codec.encode(RequestEvent(
                    kind="routed", request_id=req.request_id, pod=pod, pool=req.pool,
                    model=req.model, ts=time.time(), block_keys=req.block_keys)))
            return ScheduleDecision(request_id=req.request_id, pod=pod,
                                    url=self.engines[pod].url, profile="stub",
                                    num_tokens=req.num_tokens,
                                    tokens_partial=req.tokens_partial)

        svc.endpoint("schedule", "im.schedule", ScheduleRequest, schedule, "scheduler")
        await svc.start()
        self.services.append(svc)

    async def add_engine(self, name: str, mode: str = "ok") -> None:
        self.engines[name] = await FakeEngine(mode).start()

    async def _heartbeats(self) -> None:
        while True:
            for name, e in list(self.engines.items()) if self.beating else ():
                st = PodState(pod=name, pool="default", model=MODEL, url=e.url, ts=time.time(),
                              epoch="e", kv_seq=0, block_size=16, max_model_len=1000,
                              adapters=["lora-x"], waiting=self.waiting.get(name, 0))
                await self.nc.publish(f"im.pod.default.{name}", codec.encode(st))
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        await self.ingress.stop()
        for t in self.tasks:
            t.cancel()
        for s in self.services:
            await s.stop()
        for e in self.engines.values():
            await e.stop()
        await self.nc.close()


@pytest.fixture
async def world(nats_server):
    w = World(nats_server.url)
    yield w
    await w.stop()


async def post(url: str, body: Any = None, *, raw: bytes | None = None,
               path: str = "/v1/completions") -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http:
        data = raw if raw is not None else json.dumps(body).encode()
        async with http.post(url + path, data=data,
                             headers={"Content-Type": "application/json"}) as r:
            return r.status, dict(r.headers), await r.read()


async def test_failed_engine_before_first_byte_is_retried_elsewhere(world) -> None:
    await world.start({"a": "503", "b": "ok"})
    status, headers, body = await post(world.url, {"model": MODEL, "prompt": "hello"})
    assert status == 200 and headers["x-infermesh-endpoint"] == "b"
    assert world.engines["a"].hits == 1 and world.engines["b"].hits == 1
    assert world.schedule_calls[-1].exclude == ["a"]
    await wait_until(lambda: len(world.events) >= 4, what="request events")
    kinds = [(e.kind, e.pod, e.status) for e in world.events]
    assert kinds == [("routed", "a", "ok"), ("finished", "a", "failed"),
                     ("routed", "b", "ok"), ("finished", "b", "ok")]
    assert world.events[0].block_keys == [1, 2, 3]
    assert world.events[-1].cached_tokens == 2 and world.events[-1].output_tokens == 1


async def test_unreachable_engine_is_retried_and_streams_pass_through(world) -> None:
    await world.start({"a": "ok", "b": "ok"})
    await world.engines["a"].stop()  # its heartbeat goes on: a crashed process looks like this
    status, headers, body = await post(world.url, {"model": MODEL, "prompt": "x", "stream": True})
    assert status == 200 and headers["x-infermesh-endpoint"] == "b"
    assert body.endswith(b"data: [DONE]\n\n") and b'"cached_tokens":2' in body
    await wait_until(lambda: any(e.kind == "first_token" for e in world.events), what="events")
    await wait_until(lambda: any(e.kind == "finished" and e.pod == "b" for e in world.events),
                     what="finished event")
    fin = [e for e in world.events if e.kind == "finished" and e.pod == "b"]
    assert fin[0].cached_tokens == 2 and fin[0].ttft_s is not None


async def test_every_engine_failing_is_a_clean_503(world) -> None:
    await world.start({"a": "503", "b": "503"}, max_attempts=2)
    status, _, body = await post(world.url, {"model": MODEL, "prompt": "x"})
    # The last engine's own answer passes through once attempts run out.
    assert status == 503 and json.loads(body)["error"]


async def test_engine_dying_mid_stream_gives_the_client_a_clean_end(world) -> None:
    await world.start({"a": "die"})
    status, _, body = await post(world.url, {"model": MODEL, "prompt": "x", "stream": True})
    assert status == 200
    assert b"failed mid-stream" in body and body.endswith(b"data: [DONE]\n\n")


async def test_control_plane_away_routes_by_load(world) -> None:
    await world.start({"a": "ok", "b": "ok"}, tokenizer=False, scheduler=False)
    for _ in range(6):
        status, headers, _ = await post(world.url, {"model": MODEL, "prompt": "x"})
        assert status == 200 and headers["x-infermesh-endpoint"] in {"a", "b"}
    async with aiohttp.ClientSession() as http:
        async with http.get(world.url + "/metrics") as r:
            text = await r.text()
    assert 'infermesh_ingress_fallbacks_total{reason="scheduler_unavailable"} 6.0' in text
    assert 'infermesh_ingress_fallbacks_total{reason="tokenizer_unavailable"} 6.0' in text
    # The scheduler comes back: routing goes through it again, with no further fallback.
    await world.start_scheduler()
    for _ in range(4):
        status, headers, _ = await post(world.url, {"model": MODEL, "prompt": "x"})
        assert status == 200 and headers["x-infermesh-endpoint"] == "a"  # the stub's choice
    assert len(world.schedule_calls) == 4
    async with aiohttp.ClientSession() as http:
        async with http.get(world.url + "/metrics") as r:
            text = await r.text()
    assert 'infermesh_ingress_fallbacks_total{reason="scheduler_unavailable"} 6.0' in text


async def test_bad_requests_get_openai_errors_never_500(world) -> None:
    await world.start({"a": "ok"}, max_body_bytes=4096, max_prompt_tokens=50)
    cases: list[tuple[dict[str, Any], int]] = [
        ({"raw": b""}, 400),
        ({"raw": b"{not json"}, 400),
        ({"raw": b"[1, 2, 3]"}, 400),
        ({"raw": b'"a string"'}, 400),
        ({"body": {"model": MODEL}}, 400),  # no prompt
        ({"body": {"model": MODEL, "prompt": 5}}, 400),
        ({"body": {"model": MODEL, "prompt": [1, "x"]}}, 400),
        ({"body": {"model": MODEL, "prompt": "x", "stream": "yes"}}, 400),
        ({"body": {"model": 7, "prompt": "x"}}, 400),
        ({"body": {"model": "nope", "prompt": "x"}}, 404),
        ({"body": {"model": MODEL, "prompt": "y" * 60}}, 400),  # over max_prompt_tokens
        ({"raw": b'{"model": "m", "prompt": "' + b"z" * 5000 + b'"}'}, 413),
        ({"body": {"model": MODEL, "messages": "hi"}, "path": "/v1/chat/completions"}, 400),
        ({"body": {"model": MODEL, "messages": []}, "path": "/v1/chat/completions"}, 400),
        ({"body": {"model": MODEL, "messages": [1]}, "path": "/v1/chat/completions"}, 400),
        ({"raw": "{\"model\": \"m\", \"prompt\": \"\ud800\"}".encode("utf-8", "surrogatepass")},
         400),
    ]
    for case, want in cases:
        status, headers, body = await post(world.url, case.get("body"), raw=case.get("raw"),
                                           path=case.get("path", "/v1/completions"))
        assert status == want, (case, status, body[:200])
        err = json.loads(body)["error"]
        assert err["code"] == want and err["message"] and err["type"]
    # Still serving, and a LoRA adapter the heartbeats announce resolves.
    status, _, _ = await post(world.url, {"model": "lora-x", "prompt": "x"})
    assert status == 200
    async with aiohttp.ClientSession() as http:
        async with http.get(world.url + "/v1/models") as r:
            ids = [m["id"] for m in (await r.json())["data"]]
    assert ids == [MODEL, "lora-x"]


async def test_no_engine_is_503(world) -> None:
    await world.start({}, no_pod_wait_s=0.2)
    status, _, body = await post(world.url, {"model": MODEL, "prompt": "x"})
    assert status == 503 and json.loads(body)["error"]["code"] == 503


async def _metrics(url: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/metrics") as r:
            return await r.text()


async def test_a_request_that_finds_no_engine_waits_for_one(world) -> None:
    await world.start({}, no_pod_wait_s=10)
    sent = asyncio.create_task(post(world.url, {"model": MODEL, "prompt": "x"}))
    await wait_until(lambda: world.ingress.flow.held > 0,
                     what="the request waiting for an engine")
    await world.add_engine("a")  # its first heartbeat ends the wait
    status, headers, _ = await sent
    assert status == 200 and headers["x-infermesh-endpoint"] == "a"
    assert 'infermesh_ingress_no_pod_waits_total{outcome="found"} 1.0' in await _metrics(
        world.url)


async def test_the_activator_holds_in_order_tells_demand_and_bounds_the_queue(world) -> None:
    """A pool at zero: requests (streamed too) are held in arrival order, the demand goes to the
    autoscaler's subject at once and while they wait, a full queue is a 429 with Retry-After,
    and the first ready engine gets them all, oldest first."""
    demand: list[ScaleDemand] = []
    await world.start({}, no_pod_wait_s=30, hold_max_requests=5, demand_interval_s=0.2)

    async def on_scale(msg: Any) -> None:
        demand.append(codec.decode(msg.data, ScaleDemand))

    await world.nc.subscribe("im.scale.default", cb=on_scale)
    sent = []
    for i in range(5):
        body = {"model": MODEL, "prompt": f"p{i}", "stream": i % 2 == 1}
        sent.append(asyncio.create_task(post(world.url, body)))
        await wait_until(lambda i=i: world.ingress.flow.held == i + 1, what=f"{i} held")
    await wait_until(lambda: any(d.queued == 5 for d in demand), what="the demand told")
    d = next(d for d in demand if d.queued == 5)
    assert d.pool == "default" and d.replica == world.ingress.instance
    n_told = len(demand)
    await wait_until(lambda: len(demand) >= n_told + 2, what="the demand told again")
    # The queue is full: refused at once, OpenAI-style, with when to come back.
    status, headers, body = await post(world.url, {"model": MODEL, "prompt": "late"})
    err = json.loads(body)["error"]
    assert status == 429 and err["code"] == 429 and "waiting for an engine" in err["message"]
    assert int(headers["Retry-After"]) >= 1
    n_events = len(world.events)
    await world.add_engine("a")
    results = await asyncio.gather(*sent)
    assert [r[0] for r in results] == [200] * 5
    assert world.engines["a"].prompts == [f"p{i}" for i in range(5)]  # oldest first
    assert b"data: [DONE]" in results[1][2]  # a held stream streams
    # Their events say how long they were held (the autoscaler's SLO window leaves it out);
    # the first was held longest, and every TTFT includes its hold.
    await wait_until(lambda: sum(e.kind == "finished" for e in world.events[n_events:]) == 5,
                     what="the held requests' events")
    done = [e for e in world.events[n_events:] if e.kind in ("first_token", "finished")]
    assert all(e.held_s > 0 and (e.ttft_s or 0) >= e.held_s for e in done)
    after = await post(world.url, {"model": MODEL, "prompt": "not held"})
    assert after[0] == 200
    await wait_until(lambda: sum(e.kind == "finished" for e in world.events[n_events:]) == 6,
                     what="its events")
    last = [e for e in world.events[n_events:] if e.kind == "finished"][-1]
    assert last.held_s == 0.0
    await wait_until(lambda: demand[-1].queued == 0, what="the hold over, told")
    text = await _metrics(world.url)
    for line in ('infermesh_ingress_holds_total{outcome="released"} 5.0',
                 'infermesh_ingress_holds_total{outcome="refused"} 1.0',
                 "infermesh_ingress_held 0.0", "infermesh_ingress_hold_seconds_count 5.0"):
        assert line in text, line


async def test_a_hold_that_no_engine_ends_is_a_503(world) -> None:
    await world.start({}, no_pod_wait_s=0.5)
    t0 = time.monotonic()
    status, _, body = await post(world.url, {"model": MODEL, "prompt": "x", "stream": True})
    assert status == 503 and time.monotonic() - t0 >= 0.5
    assert json.loads(body)["error"]["code"] == 503
    text = await _metrics(world.url)
    assert 'infermesh_ingress_holds_total{outcome="timed_out"} 1.0' in text


async def test_late_heartbeats_keep_pods_and_a_silent_pool_is_never_emptied(world) -> None:
    """Heartbeats stop for 4x pod_timeout_s (a starved machine): every pod is silent, none is
    dropped, requests keep being served on the pods' last known state."""
    await world.start({"a": "ok", "b": "ok"}, pod_late_s=0.1, pod_timeout_s=0.5)
    world.beating = False
    t0 = time.monotonic()
    served = 0
    while time.monotonic() - t0 < 2.0:
        status, headers, _ = await post(world.url, {"model": MODEL, "prompt": "x"})
        assert status == 200 and headers["x-infermesh-endpoint"] in {"a", "b"}
        served += 1
    text = await _metrics(world.url)
    assert "infermesh_ingress_pods_late 2.0" in text
    assert 'infermesh_ingress_pods_dropped_total{reason="silent"}' not in text
    assert served > 0 and len(world.ingress.live_pods()) == 2


async def test_a_pod_silent_beside_speaking_ones_is_dropped(world) -> None:
    await world.start({"a": "ok", "b": "ok"}, pod_late_s=0.2, pod_timeout_s=0.6)
    silent = world.engines.pop("a")  # no more heartbeats for a; b keeps speaking
    try:
        await wait_until(lambda: [p.state.pod for p in world.ingress.live_pods()] == ["b"],
                         what="a dropped")
        assert 'infermesh_ingress_pods_dropped_total{reason="silent"} 1.0' in await _metrics(
            world.url)
    finally:
        await silent.stop()


async def test_an_engine_that_refused_is_skipped_by_later_requests(world) -> None:
    await world.start({"a": "ok", "b": "ok"})
    await world.engines["a"].stop()  # its port refuses connections; heartbeats still say ready
    status, headers, _ = await post(world.url, {"model": MODEL, "prompt": "x"})
    assert status == 200 and headers["x-infermesh-endpoint"] == "b"
    retries = world.ingress.metrics.retries._value.get()
    assert retries == 1
    # The next request does not try a first: the scheduler is told to leave it out.
    status, headers, _ = await post(world.url, {"model": MODEL, "prompt": "y"})
    assert status == 200 and headers["x-infermesh-endpoint"] == "b"
    assert world.ingress.metrics.retries._value.get() == retries
    assert world.schedule_calls[-1].exclude == ["a"]


async def test_a_body_that_is_not_json_by_content_type_is_refused_as_vllm_does(world) -> None:
    await world.start({"a": "ok"})
    async with aiohttp.ClientSession() as http:
        for ct in ("text/plain", "application/x-www-form-urlencoded"):
            async with http.post(world.url + "/v1/completions", data=b'{"model":"m"}',
                                 headers={"Content-Type": ct}) as r:
                assert r.status == 400
                assert "Unsupported Media Type" in (await r.json())["error"]["message"]
        async with http.post(world.url + "/v1/completions", data=b'{"model":"m","prompt":"x"}',
                             headers={"Content-Type": "application/json; charset=utf-8"}) as r:
            assert r.status == 200
    assert world.engines["a"].hits == 1


@pytest.fixture
def default_nats() -> Iterator[NatsServer]:
    """A nats-server with its default max_payload (1 MiB; the shared fixture raises it to 8)."""
    srv = NatsServer().start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("tokenize_here", [False, True], ids=["tokenizer-service", "in-ingress"])
async def test_a_prompt_too_large_for_one_bus_message_is_routed_by_load(
    default_nats: NatsServer, procs: ProcessManager,  # this order: processes stop first
    tokenize_here: bool,
) -> None:
    """Through the tokenizer service the prompt cannot travel: routed by load. Tokenized in the
    ingress, only its block keys travel (they fit): routed by the scheduler, no fallback."""
    # Room in the engine for a ~1M-token prompt, so it answers 200 rather than its own 400.
    stack = start_stack(procs, default_nats, engines=2,
                        settings={"sim": {"max_model_len": 2_000_000, "num_gpu_blocks": 200_000},
                                  "ingress": {"tokenize_here": tokenize_here}})
    prompt = "The quick brown fox jumps over the lazy dog. " * 46_000  # 2 MB, over 1 MiB
    async with aiohttp.ClientSession() as http:
        for path, body in [
            ("/v1/completions", {"model": SIM_MODEL, "prompt": prompt, "max_tokens": 2}),
            ("/v1/chat/completions", {"model": SIM_MODEL, "max_tokens": 2,
                                      "messages": [{"role": "user", "content": prompt}]}),
        ]:
            async with http.post(stack.ingress_url + path, json=body) as r:
                answer = await r.json()
                assert r.status == 200, (path, r.status, answer)
                assert r.headers["x-infermesh-endpoint"] in stack.pods
            assert answer["usage"]["prompt_tokens"] > 500_000  # the engine saw all of it
        async with http.get(stack.ingress_url + "/metrics") as r:
            text = await r.text()
    if tokenize_here:
        assert "too_large_for_bus" not in text
        assert 'infermesh_tokenizer_requests_total{kind="text"' in text
        assert 'infermesh_tokenizer_requests_total{kind="chat"' in text
    else:
        assert 'infermesh_ingress_fallbacks_total{reason="too_large_for_bus"} 2.0' in text
    assert "tokenizer_unavailable" not in text  # the tokenizer was not blamed
    assert stack.ingress is not None and stack.ingress.alive()


async def test_one_trip_routes_through_the_tokenizer_to_the_scheduler(world) -> None:
    await world.start({"a": "ok", "b": "ok"})
    status, headers, _ = await post(world.url, {"model": MODEL, "prompt": "x" * 30})
    assert status == 200 and headers["x-infermesh-endpoint"] == "a"
    # One im.route trip: the scheduler got the tokenizer's keys without the ingress asking it.
    assert world.routes == 1 and len(world.schedule_calls) == 1
    call = world.schedule_calls[0]
    assert call.block_keys == [1, 2, 3] and call.num_tokens == 30 and call.announce
    text = await _metrics(world.url)
    assert 'infermesh_ingress_route_trips_total{outcome="ok"} 1.0' in text
    # The ingress left the `routed` event to the scheduler (which holds the keys).
    await wait_until(lambda: any(e.kind == "finished" for e in world.events), what="events")
    assert [e.block_keys for e in world.events if e.kind == "routed"] == [[1, 2, 3]]


@pytest.mark.parametrize("here", [True, False], ids=["tokenize-here", "tokenize-here-off"])
async def test_a_model_whose_tokenizer_the_ingress_has_takes_one_trip_to_the_scheduler(
        world, here: bool) -> None:
    folder = ensure_model_folder()
    await world.start({"a": "ok", "b": "ok"}, models=[f"{MODEL}={folder}"], tokenize_here=here)
    prompt = "The quick brown fox jumps over the lazy dog. " * 12
    status, headers, _ = await post(world.url, {"model": MODEL, "prompt": prompt})
    assert status == 200 and headers["x-infermesh-endpoint"] == "a"
    text = await _metrics(world.url)
    (call,) = world.schedule_calls
    if not here:  # the tokenizer service's keys, one im.route trip
        assert world.routes == 1 and call.block_keys == [1, 2, 3]
        assert "infermesh_tokenizer_requests_total" not in text
        return
    # Tokenized in the ingress: no tokenizer asked, the scheduler got the real keys.
    assert world.routes == 0 and world.tokenize_asks == 0
    ids = ModelTokenizer.from_folder(folder).encode(prompt)
    assert call.num_tokens == len(ids) and not call.tokens_partial and call.announce
    assert call.block_keys == prompt_keys(MODEL, ids, 16) and len(call.block_keys) > 3
    assert f'infermesh_tokenizer_requests_total{{kind="text",model="{MODEL}"}} 1.0' in text
    assert "infermesh_ingress_route_trips_total{" not in text
    # The scheduler announced the decision; the ingress did not publish it again.
    await wait_until(lambda: any(e.kind == "finished" for e in world.events), what="events")
    assert [e.block_keys for e in world.events if e.kind == "routed"] == [call.block_keys]


async def test_a_model_tokenized_here_is_routed_by_load_when_no_scheduler_answers(world) -> None:
    await world.start({"a": "ok"}, scheduler=False, models=[f"{MODEL}={ensure_model_folder()}"])
    status, headers, _ = await post(world.url, {"model": MODEL, "prompt": "hello " * 40})
    assert status == 200 and headers["x-infermesh-endpoint"] == "a"
    assert world.tokenize_asks == 0
    # Nobody announced it: the ingress published the routed event, with its own keys.
    await wait_until(lambda: any(e.kind == "routed" for e in world.events), what="routed event")
    (routed,) = [e for e in world.events if e.kind == "routed"]
    assert len(routed.block_keys) > 0


async def test_the_ingress_decides_with_its_own_scheduler_replica(world) -> None:
    """schedule_here: tokenized and decided in the ingress, no bus trip; the decision is
    announced with the keys, and a failed engine is left out of the next decision, here too."""
    folder = ensure_model_folder()
    await world.start({"a": "503", "b": "ok"}, schedule_here=True, models=[f"{MODEL}={folder}"])
    sched = world.ingress.sched
    assert sched is not None
    await wait_until(lambda: len(sched.pods) == 2, what="the ingress's scheduler to hear pods")
    prompt = "The quick brown fox jumps over the lazy dog. " * 12
    status, headers, _ = await post(world.url, {"model": MODEL, "prompt": prompt})
    assert status == 200
    # Whichever pod it chose first, the answer came from b: a failed before its first byte.
    assert headers["x-infermesh-endpoint"] == "b"
    assert world.schedule_calls == [] and world.tokenize_asks == 0 and world.routes == 0
    keys = prompt_keys(MODEL, ModelTokenizer.from_folder(folder).encode(prompt), 16)
    await wait_until(lambda: any(e.kind == "finished" and e.pod == "b" for e in world.events),
                     what="events")
    routed = [e for e in world.events if e.kind == "routed"]
    assert routed and all(e.block_keys == keys for e in routed)
    assert routed[-1].pod == "b" and routed[-1].replica == world.ingress.instance
    assert len(routed) == world.engines["a"].hits + 1  # one decision per attempt, announced
    text = await _metrics(world.url)
    assert 'infermesh_scheduler_decisions_total{pod="b",profile="default"}' in text
    async with aiohttp.ClientSession() as http, http.get(world.url + "/health") as r:
        assert (await r.json())["scheduler"]["decisions"] == len(routed)


async def test_when_its_own_replica_knows_no_engine_the_scheduler_service_decides(world) -> None:
    await world.start({"a": "ok", "b": "ok"}, schedule_here=True,
                      models=[f"{MODEL}={ensure_model_folder()}"])
    sched = world.ingress.sched
    assert sched is not None
    await sched.stop()  # it hears no heartbeat any more ...
    sched.pods = PodTable(10.0)  # ... and knows no pod, as right after a start
    status, headers, _ = await post(world.url, {"model": MODEL, "prompt": "hello " * 30})
    assert status == 200 and headers["x-infermesh-endpoint"] == "a"
    (call,) = world.schedule_calls  # the stub scheduler service decided, and announced it
    assert call.announce and len(call.block_keys) > 0
    text = await _metrics(world.url)
    assert 'infermesh_ingress_fallbacks_total{reason="scheduled_here_no_engine"} 1.0' in text


async def test_without_a_route_endpoint_the_ingress_asks_each_service_in_turn(world) -> None:
    await world.start({"a": "ok"}, route_endpoint=False)
    status, headers, _ = await post(world.url, {"model": MODEL, "prompt": "x" * 30})
    assert status == 200 and headers["x-infermesh-endpoint"] == "a"
    assert world.routes == 0 and world.schedule_calls[0].block_keys == [1, 2, 3]
    assert not world.schedule_calls[0].announce
    assert 'infermesh_ingress_route_trips_total{outcome="fallback_unavailable"} 1.0' in (
        await _metrics(world.url))
    await wait_until(lambda: any(e.kind == "routed" for e in world.events), what="routed event")


@pytest.mark.parametrize("chained", [True, False])
async def test_a_partial_count_is_left_to_the_engine_unless_max_prompt_tokens(
        world, chained: bool) -> None:
    # The estimate (5000) is over the engines' max_model_len (1000): the engine checks the
    # exact count itself, so the ingress does not refuse on an estimate.
    await world.start({"a": "ok"}, chained_routing=chained)
    status, _, body = await post(world.url, {"model": MODEL, "prompt": "PARTIAL" + "x" * 50})
    assert status == 200 and world.exact_asks == 0, body
    assert world.schedule_calls[-1].tokens_partial


async def test_max_prompt_tokens_asks_for_the_exact_count_of_a_partial_reply(world) -> None:
    await world.start({"a": "ok"}, max_prompt_tokens=100)
    status, _, _ = await post(world.url, {"model": MODEL, "prompt": "PARTIAL" + "x" * 50})
    assert status == 200 and world.exact_asks == 1  # 57 tokens: fits
    status, _, body = await post(world.url, {"model": MODEL, "prompt": "PARTIAL" + "x" * 200})
    assert status == 400 and world.exact_asks == 2
    assert "207 input tokens" in json.loads(body)["error"]["message"]
