"""libs/bus against a real nats-server: typed services, errors, discovery, tracing, reconnects."""

from __future__ import annotations

import asyncio
import json

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from infermesh.libs.bus import (
    BUS_REGISTRY,
    BusService,
    BusTimeout,
    NatsServer,
    NoResponders,
    RemoteError,
    connect,
    reply_error,
    request,
    settle,
)
from infermesh.libs.telemetry import tracer
from infermesh.libs.telemetry.tracing import setup_tracing
from infermesh.proto.messages import LookupReply, LookupRequest, PodMatch

from .helpers import wait_until


async def _lookup_service(nc) -> BusService:
    svc = BusService(nc, "test-indexer", description="test")

    async def handle(req: LookupRequest) -> LookupReply:
        if not req.block_keys:
            raise reply_error(422, "no block keys")
        if req.model == "boom":
            raise RuntimeError("handler bug")
        return LookupReply(matches=[PodMatch(pod="p", blocks=len(req.block_keys))])

    svc.endpoint("lookup", "im.index.lookup", LookupRequest, handle, queue_group="indexer")
    await svc.start()
    return svc


async def test_typed_service_answers_and_survives_bad_requests(nats_server):
    nc = await connect(nats_server.url, "t")
    svc = await _lookup_service(nc)
    ok = await request(nc, "im.index.lookup", LookupRequest(model="m", block_keys=[1, 2]),
                       LookupReply)
    assert ok.matches[0].blocks == 2
    with pytest.raises(RemoteError) as e:
        await request(nc, "im.index.lookup", LookupRequest(model="m", block_keys=[]), LookupReply)
    assert e.value.code == "422"
    with pytest.raises(RemoteError) as e:
        await request(nc, "im.index.lookup", LookupRequest(model="boom", block_keys=[1]),
                      LookupReply)
    assert e.value.code == "500" and "handler bug" in e.value.description
    for junk in (b"", b"\xc1", b"\x93\x01\x02\x03", b"x" * 100_000):
        r = await nc.request("im.index.lookup", junk, timeout=2)
        assert r.headers["Nats-Service-Error-Code"] == "400"
    # Still serving, and discovery works.
    assert (await request(nc, "im.index.lookup", LookupRequest(model="m", block_keys=[7]),
                          LookupReply)).matches[0].blocks == 1
    for verb in ("PING", "INFO", "STATS"):
        r = await nc.request(f"$SRV.{verb}.test-indexer", b"", timeout=2)
        assert json.loads(r.data)["name"] == "test-indexer"
    stats = json.loads((await nc.request("$SRV.STATS.test-indexer", b"", timeout=2)).data)
    ep = stats["endpoints"][0]
    assert ep["num_requests"] >= 8 and ep["num_errors"] == 0  # ours answer errors themselves
    assert svc.requests.labels("test-indexer", "lookup", "bad_request")._value.get() == 4
    await svc.stop()
    with pytest.raises(NoResponders):
        await request(nc, "im.index.lookup", LookupRequest(model="m", block_keys=[1]),
                      LookupReply, timeout=0.5)
    await nc.close()


async def test_timeout_is_typed(nats_server):
    nc = await connect(nats_server.url, "t")
    sub = await nc.subscribe("im.slow")  # subscribed, never answers
    with pytest.raises(BusTimeout):
        await request(nc, "im.slow", LookupRequest(model="m", block_keys=[1]), LookupReply,
                      timeout=0.2)
    await sub.unsubscribe()
    await nc.close()


async def test_trace_context_crosses_the_bus(nats_server):
    exporter = InMemorySpanExporter()
    setup_tracing("test", exporter)
    nc = await connect(nats_server.url, "t")
    await _lookup_service(nc)
    with tracer().start_as_current_span("client") as span:
        await request(nc, "im.index.lookup", LookupRequest(model="m", block_keys=[1]),
                      LookupReply)
        trace_id = span.get_span_context().trace_id
    names = {s.name: s for s in exporter.get_finished_spans()}
    server_span = names["test-indexer.lookup"]
    assert server_span.context.trace_id == trace_id
    assert server_span.parent is not None
    await nc.close()


async def test_client_reconnects_after_the_server_restarts():
    srv = NatsServer()
    srv.start()
    try:
        nc = await connect(srv.url, "t")
        got: list[bytes] = []

        async def cb(msg) -> None:
            got.append(msg.data)

        await nc.subscribe("im.x", cb=cb)
        await settle(nc)
        srv.kill()
        await wait_until(lambda: not nc.is_connected, what="disconnect noticed")
        srv2 = NatsServer(srv.port)
        srv2.start()
        try:
            await wait_until(lambda: nc.is_connected, timeout=30, what="reconnected")
            pub = await connect(srv2.url, "p")
            # The subscription was restored on reconnect.
            async def delivered() -> bool:
                await pub.publish("im.x", b"hello")
                await settle(pub)
                await asyncio.sleep(0.05)
                return b"hello" in got

            await wait_until(delivered, what="message after reconnect")
            # Counted for the service's /metrics.
            assert BUS_REGISTRY.get_sample_value("infermesh_bus_disconnects_total",
                                                 {"client": "t"}) >= 1
            assert BUS_REGISTRY.get_sample_value("infermesh_bus_reconnects_total",
                                                 {"client": "t"}) >= 1
            await pub.close()
            await nc.close()
        finally:
            srv2.stop()
    finally:
        srv.stop()
