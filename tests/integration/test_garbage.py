"""Garbage on the agent's ZMQ socket and on its bus subjects is counted and dropped; the agent
keeps working."""

from __future__ import annotations

import aiohttp
import msgspec
import zmq
import zmq.asyncio

from infermesh.libs.bus import RemoteError, connect, request_parts
from infermesh.libs.process.ports import free_port
from infermesh.proto.messages import Snapshot, SnapshotRequest
from infermesh.proto.vllm_kv import EngineEvent, VllmEventEncoder

from .helpers import BusWatcher, wait_until


async def _metric(http: aiohttp.ClientSession, port: int, name: str) -> float:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    return 0.0


async def test_zmq_garbage_is_counted_and_valid_batches_still_flow(nats_server, procs):
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.XPUB)  # XPUB: we see the agent's subscription arrive
    pub.setsockopt(zmq.LINGER, 0)
    kv_port = pub.bind_to_random_port("tcp://127.0.0.1")
    http_port = free_port()
    fake = {"http": "http://127.0.0.1:9", "kv": f"tcp://127.0.0.1:{kv_port}", "replay": ""}
    nc = await connect(nats_server.url, "test")
    watch = await BusWatcher(nc).start()
    agent = procs.agent(nats_server.url, fake, "pod-g", "--http-port", str(http_port))
    try:
        assert await pub.poll(20_000), "agent never subscribed"
        assert (await pub.recv())[0] == 1  # a subscribe message
        enc = VllmEventEncoder("map")
        good = enc.encode(1.0, [EngineEvent("stored", [42, 43], None, [1, 2, 3, 4], 2)])
        garbage = [
            [b"only-one-frame"],
            [b"topic", b"123", good],  # seq frame not 8 bytes
            [b"topic", (0).to_bytes(8, "big"), b"\xc1\xc1 not msgpack"],
            [b"topic", (1).to_bytes(8, "big"), msgspec.msgpack.encode({"ts": "x"})],
            [b"a", b"b", b"c", b"d"],
        ]
        for frames in garbage:
            await pub.send_multipart(frames)
        await pub.send_multipart([b"topic", (2).to_bytes(8, "big"), good])
        view = watch.view("pod-g")
        await wait_until(lambda: view.gpu == {42, 43}, what="the valid batch on the bus")
        async with aiohttp.ClientSession() as http:
            await wait_until(lambda: _metric(http, http_port, "infermesh_agent_bad_frames"),
                             what="agent metrics served")
            assert await _metric(http, http_port, "infermesh_agent_bad_frames") == 3
            assert await _metric(http, http_port, "infermesh_agent_bad_payloads") == 2
        assert agent.alive()
    finally:
        pub.close(0)
        ctx.term()
        await nc.close()


async def test_bus_garbage_gets_structured_errors(nats_server, procs):
    _, info = procs.sim("--time-scale", "0")
    eng = info["engines"][0]
    nc = await connect(nats_server.url, "test")
    watch = await BusWatcher(nc).start()
    agent = procs.agent(nats_server.url, eng, "pod-h")
    await wait_until(lambda: "pod-h" in watch.states and watch.states["pod-h"].ready,
                     what="agent ready")
    subject = "im.snapshot.pod-h"
    for junk in (b"", b"\x00\xff garbage", msgspec.msgpack.encode({"pod": 5}),
                 msgspec.msgpack.encode([1, 2, 3]), b"{" * 10_000):
        resp = await nc.request(subject, junk, timeout=5)
        assert resp.headers and resp.headers.get("Nats-Service-Error-Code") == "400", junk[:20]
    try:
        await request_parts(nc, subject, SnapshotRequest(pod="someone-else"), Snapshot,
                            parts_of=lambda s: (s.part, s.parts))
        raise AssertionError("expected an error")
    except RemoteError as e:
        assert e.code == "404"
    # Garbage on the subjects the agent publishes to is other consumers' problem, but must
    # not disturb the agent either.
    for subj in ("im.kv.default.pod-h", "im.pod.default.pod-h"):
        await nc.publish(subj, b"\xc1garbage")
    parts = await request_parts(nc, subject, SnapshotRequest(pod="pod-h"), Snapshot,
                                parts_of=lambda s: (s.part, s.parts))
    assert parts[0].pod == "pod-h"
    before = watch.states["pod-h"].ts
    await wait_until(lambda: watch.states["pod-h"].ts > before, what="heartbeats continue")
    assert agent.alive()
    await nc.close()
