"""The ingress's two-step prefill/decode protocol against fake engines and a stub scheduler
whose decisions name a prefill pod: what each engine receives, retries of either leg, fallbacks
to serving the request whole, and the events and headers of both legs."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest

from infermesh.libs.bus import BusService
from infermesh.proto import codec
from infermesh.proto.messages import PodState, RequestEvent, ScheduleDecision, ScheduleRequest

from .helpers import wait_until
from .test_ingress import MODEL, FakeEngine, World, post

PARAMS = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[1, 2]],
          "remote_engine_id": "eng", "remote_request_id": "r", "remote_host": "h",
          "remote_port": 1, "tp_size": 1}


class PDEngine(FakeEngine):
    """A fake vLLM with a NIXL connector: a prefill request gets kv_transfer_params back.

    Modes: ok, 503 (fails), 400 (refuses), noparams (answers without params)."""

    def __init__(self, name: str, mode: str = "ok") -> None:
        super().__init__(mode)
        self.name = name
        self.bodies: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.hits += 1
        if self.mode == "503":
            return web.json_response({"error": {"message": "busy", "code": 503}}, status=503)
        if self.mode == "400":
            return web.json_response({"error": {"message": "too long", "code": 400}},
                                     status=400)
        kv = body.get("kv_transfer_params") or {}
        if kv.get("do_remote_decode"):  # the prefill leg
            out: dict[str, Any] = {"choices": [{"text": "x"}], "usage": {
                "prompt_tokens": 40, "completion_tokens": 1}}
            if self.mode != "noparams":
                out["kv_transfer_params"] = {**PARAMS, "remote_engine_id": self.name}
            return web.json_response(out)
        usage = {"prompt_tokens": 40, "completion_tokens": 2,
                 "prompt_tokens_details": {"cached_tokens": 7}}
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b'data: {"choices":[{"text":"a"}]}\n\n')
            await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode()
                             + b"\n\ndata: [DONE]\n\n")
            return resp
        return web.json_response({"choices": [{"text": "ab"}], "usage": usage})


class PDWorld(World):
    """Prefill engines p*, decode engines d*; the stub scheduler picks the first of each by
    name that is not excluded (no prefill pod: served whole)."""

    async def start_pd(self, engines: dict[str, str], **cfg: Any) -> None:
        self.pd: dict[str, PDEngine] = {}
        for name, mode in engines.items():
            self.pd[name] = await PDEngine(name, mode).start()
        self.engines = self.pd  # type: ignore[assignment] - heartbeats and pod count
        await self._stub_scheduler()
        await self.start({}, scheduler=False, **cfg)

    async def _stub_scheduler(self) -> None:
        from infermesh.libs.bus import connect

        self.snc = await connect(self.nats_url, "stub-scheduler")
        svc = BusService(self.snc, "stub-pd-scheduler")

        async def schedule(req: ScheduleRequest) -> ScheduleDecision:
            self.schedule_calls.append(req)
            left = sorted(p for p in self.pd if p not in req.exclude)
            dec = [p for p in left if p.startswith("d")][0]
            pre = [p for p in left if p.startswith("p")]
            return ScheduleDecision(request_id=req.request_id, pod=dec, url=self.pd[dec].url,
                                    profile="stub", num_tokens=req.num_tokens,
                                    prefill_pod=pre[0] if pre else "",
                                    prefill_url=self.pd[pre[0]].url if pre else "",
                                    prefill_profile="prefill" if pre else "")

        svc.endpoint("schedule", "im.schedule", ScheduleRequest, schedule, "scheduler")
        await svc.start()
        self.services.append(svc)

    async def _heartbeats(self) -> None:
        while True:
            for name, e in list(self.engines.items()):
                st = PodState(pod=name, pool="default", model=MODEL, url=e.url, ts=time.time(),
                              epoch="e", kv_seq=0, block_size=16, max_model_len=1000,
                              role="prefill" if name.startswith("p") else "decode")
                await self.nc.publish(f"im.pod.default.{name}", codec.encode(st))
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        await super().stop()
        await self.snc.close()


async def pd_world(nats_server: Any, engines: dict[str, str], **cfg: Any) -> PDWorld:
    w = PDWorld(nats_server.url)
    await w.start_pd(engines, chained_routing=False, **cfg)
    return w


def outcomes(w: PDWorld) -> dict[str, float]:
    out = {}
    for line in generate_latest(w.ingress.metrics.registry).decode().splitlines():
        if line.startswith("infermesh_ingress_pd_requests_total{"):
            out[line.split('outcome="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


async def test_prefill_then_decode_with_the_returned_params(nats_server) -> None:
    w = await pd_world(nats_server, {"p1": "ok", "d1": "ok"})
    try:
        for stream in (False, True):
            body = {"model": MODEL, "prompt": "hello " * 20, "max_tokens": 30, "stream": stream,
                    "stream_options": {"include_usage": True}, "min_tokens": 2}
            status, headers, data = await post(w.url, body)
            assert status == 200
            assert headers["x-infermesh-endpoint"] == "d1"
            assert headers["x-infermesh-prefill-endpoint"] == "p1"
            pre, dec = w.pd["p1"].bodies[-1], w.pd["d1"].bodies[-1]
            # The prefill leg: one token, not streamed, asking for remote decode.
            assert pre["max_tokens"] == 1 and pre["stream"] is False
            assert "stream_options" not in pre and "min_tokens" not in pre
            assert pre["kv_transfer_params"] == {
                "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                "remote_block_ids": None, "remote_host": None, "remote_port": None}
            # The decode leg: the client's request, with the prefill's params verbatim.
            assert dec["max_tokens"] == 30 and dec.get("stream") is stream
            assert dec["min_tokens"] == 2 and dec["prompt"] == body["prompt"]
            assert dec["kv_transfer_params"] == {**PARAMS, "remote_engine_id": "p1"}
            if stream:
                assert data.endswith(b"data: [DONE]\n\n") and b'"cached_tokens": 7' in data
            else:
                assert json.loads(data)["usage"]["prompt_tokens_details"]["cached_tokens"] == 7
        # Chat: the completion-token cap of chat is set too.
        status, _, _ = await post(w.url, {"model": MODEL, "max_completion_tokens": 9,
                                          "messages": [{"role": "user", "content": "hi"}]},
                                  path="/v1/chat/completions")
        assert status == 200
        pre, dec = w.pd["p1"].bodies[-1], w.pd["d1"].bodies[-1]
        assert pre["max_completion_tokens"] == 1 and pre["max_tokens"] == 1
        assert dec["max_completion_tokens"] == 9 and "max_tokens" not in dec
        assert outcomes(w) == {"disaggregated": 3.0}
        # Both legs have events: the prefill leg under its own id, then the decode leg.
        await wait_until(lambda: sum(e.kind == "finished" for e in w.events) >= 6, what="events")
        legs = [(e.kind, e.pod, e.leg, e.request_id.endswith("-prefill")) for e in w.events
                if e.kind != "first_token"][:4]
        assert legs == [("routed", "d1", "decode", False), ("routed", "p1", "prefill", True),
                        ("finished", "p1", "prefill", True), ("finished", "d1", "", False)]
    finally:
        await w.stop()


async def test_a_failed_prefill_engine_is_replaced_then_the_decode_prefills_itself(
        nats_server) -> None:
    w = await pd_world(nats_server, {"p1": "503", "p2": "ok", "d1": "ok"})
    try:
        status, headers, _ = await post(w.url, {"model": MODEL, "prompt": "x" * 50})
        assert status == 200 and headers["x-infermesh-prefill-endpoint"] == "p2"
        assert w.pd["p1"].hits == 1 and w.pd["p2"].hits == 1
        assert w.pd["d1"].bodies[-1]["kv_transfer_params"]["remote_engine_id"] == "p2"
        assert outcomes(w) == {"prefill_retried": 1.0, "disaggregated": 1.0}
        w.pd["p2"].mode = "503"  # no prefill engine answers: decoded whole
        status, headers, _ = await post(w.url, {"model": MODEL, "prompt": "y" * 50})
        assert status == 200 and headers["x-infermesh-endpoint"] == "d1"
        assert "x-infermesh-prefill-endpoint" not in headers
        assert "kv_transfer_params" not in w.pd["d1"].bodies[-1]
        assert outcomes(w)["prefill_failed"] == 1.0
        await wait_until(lambda: sum(e.status == "http_503" and e.leg == "prefill"
                                     for e in w.events) >= 3, what="failed prefill legs")
    finally:
        await w.stop()


async def test_a_prefill_refusal_is_the_answer(nats_server) -> None:
    w = await pd_world(nats_server, {"p1": "400", "d1": "ok"})
    try:
        status, headers, data = await post(w.url, {"model": MODEL, "prompt": "x" * 50})
        assert status == 400 and json.loads(data)["error"]["message"] == "too long"
        assert w.pd["d1"].hits == 0
    finally:
        await w.stop()


async def test_a_prefill_answer_without_params_is_decoded_whole(nats_server) -> None:
    w = await pd_world(nats_server, {"p1": "noparams", "d1": "ok"})
    try:
        status, headers, _ = await post(w.url, {"model": MODEL, "prompt": "x" * 50})
        assert status == 200 and "kv_transfer_params" not in w.pd["d1"].bodies[-1]
        assert outcomes(w) == {"no_kv_params": 1.0}
    finally:
        await w.stop()


async def test_a_failed_decode_is_retried_whole_on_another_decode_engine(nats_server) -> None:
    w = await pd_world(nats_server, {"p1": "ok", "d1": "503", "d2": "ok"})
    try:
        status, headers, _ = await post(w.url, {"model": MODEL, "prompt": "x" * 50,
                                                "stream": True})
        assert status == 200 and headers["x-infermesh-endpoint"] == "d2"
        assert "kv_transfer_params" in w.pd["d1"].bodies[-1]  # first decode: with the KV
        assert "kv_transfer_params" not in w.pd["d2"].bodies[-1]  # the retry computes it
        assert w.pd["p1"].hits == 1  # prefilled once
        assert outcomes(w) == {"disaggregated": 1.0, "decode_retried_whole": 1.0}
        assert w.schedule_calls[-1].exclude == ["d1"]
        ev = [e for e in w.events if e.kind == "finished"]
        assert ev  # (events are best effort, but they flow here)
    finally:
        await w.stop()


async def test_no_prefill_pod_in_the_decision_is_a_plain_request(nats_server) -> None:
    w = await pd_world(nats_server, {"d1": "ok"})
    try:
        status, headers, _ = await post(w.url, {"model": MODEL, "prompt": "x"})
        assert status == 200 and "x-infermesh-prefill-endpoint" not in headers
        assert "kv_transfer_params" not in w.pd["d1"].bodies[-1]
        assert outcomes(w) == {}
    finally:
        await w.stop()


_ = RequestEvent  # (decoded by the World's subscription)
