"""Benchmark: agent throughput, block events per second from an engine's ZMQ socket to NATS.

Not a test of speed (nothing is asserted about time): it prints medians and spreads over several
runs, next to a baseline measured in the same process on the same nats-server — the same
traffic published straight to NATS, which is what the agent would cost if it were free.

Run with `make bench` (or `pytest -m bench -s tests/bench`).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time

import msgspec
import pytest
import zmq
import zmq.asyncio

from infermesh.libs.bus import NatsServer, connect
from infermesh.proto import codec
from infermesh.proto.messages import BlockStored, KVEventBatch
from infermesh.proto.vllm_kv import EngineEvent, VllmEventEncoder

pytestmark = pytest.mark.bench

BATCHES = int(os.environ.get("BENCH_AGENT_BATCHES", "2000"))
RUNS = int(os.environ.get("BENCH_AGENT_RUNS", "5"))
EVENTS_PER_BATCH = 16
BLOCKS_PER_EVENT = 4
BS = 16


def engine_payloads(n: int, start_hash: int) -> list[bytes]:
    """n vLLM 0.32 batches, each with 16 BlockStored events of 4 blocks (64 block events)."""
    enc = VllmEventEncoder("map")
    out = []
    h = start_hash
    for _ in range(n):
        events = []
        for _ in range(EVENTS_PER_BATCH):
            hashes = list(range(h, h + BLOCKS_PER_EVENT))
            h += BLOCKS_PER_EVENT
            events.append(EngineEvent("stored", hashes, h - 1, list(range(BS)) * BLOCKS_PER_EVENT,
                                      BS))
        out.append(enc.encode(time.time(), events, 0))
    return out


class Counter:
    def __init__(self, target: int) -> None:
        self.blocks = 0
        self.target = target
        self.done = asyncio.Event()
        self.first: float | None = None
        self.last = 0.0

    async def on_msg(self, msg) -> None:
        b = codec.decode(msg.data, KVEventBatch)
        for e in b.events:
            if isinstance(e, BlockStored):
                self.blocks += len(e.block_hashes)
        self.last = time.perf_counter()
        if self.blocks >= self.target:
            self.done.set()


async def run_agent_once(srv: NatsServer, run: int) -> float:
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    nc = await connect(srv.url, "bench")
    target = BATCHES * EVENTS_PER_BATCH * BLOCKS_PER_EVENT
    counter = Counter(target)
    await nc.subscribe(f"im.kv.default.bench{run}", cb=counter.on_msg)
    await nc.flush()
    payloads = engine_payloads(BATCHES, 1 + run * 10**9)
    # --model: no engine HTTP here, and an agent that must learn its model waits for it first.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "infermesh.services.agent", "--nats-url", srv.url,
        "--pod", f"bench{run}", "--engine-url", "http://127.0.0.1:9", "--model", "bench",
        "--kv-endpoint", f"tcp://127.0.0.1:{port}", "--http-port", "-1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert await pub.poll(30_000), "agent did not subscribe"
        await pub.recv()
        t0 = time.perf_counter()
        for seq, p in enumerate(payloads):
            await pub.send_multipart((b"", seq.to_bytes(8, "big"), p))
        await asyncio.wait_for(counter.done.wait(), 120)
        return target / (counter.last - t0)
    finally:
        proc.terminate()
        await proc.wait()
        pub.close(0)
        ctx.term()
        await nc.close()


async def run_baseline_once(srv: NatsServer) -> float:
    """The same block events, already in our schema, published straight to NATS."""
    nc = await connect(srv.url, "bench-base")
    pubc = await connect(srv.url, "bench-pub")
    target = BATCHES * EVENTS_PER_BATCH * BLOCKS_PER_EVENT
    counter = Counter(target)
    await nc.subscribe("im.kv.default.base", cb=counter.on_msg)
    await nc.flush()
    events = [BlockStored(block_hashes=list(range(i, i + BLOCKS_PER_EVENT)), parent_hash=i,
                          token_ids=list(range(BS)) * BLOCKS_PER_EVENT, block_size=BS)
              for i in range(EVENTS_PER_BATCH)]
    t0 = time.perf_counter()
    for seq in range(BATCHES):
        await pubc.publish("im.kv.default.base", codec.encode(KVEventBatch(
            pod="base", pool="default", epoch="e", seq=seq + 1, ts=time.time(), events=events)))
    await asyncio.wait_for(counter.done.wait(), 120)
    rate = target / (counter.last - t0)
    await pubc.close()
    await nc.close()
    return rate


def _summary(xs: list[float]) -> str:
    xs = sorted(xs)
    return (f"median {statistics.median(xs):>10,.0f}   min {xs[0]:>10,.0f}   "
            f"max {xs[-1]:>10,.0f}")


def test_agent_throughput() -> None:
    srv = NatsServer(max_payload=8 * 1024 * 1024).start()
    try:
        agent_rates, base_rates = [], []
        for run in range(RUNS):
            base_rates.append(asyncio.run(run_baseline_once(srv)))
            agent_rates.append(asyncio.run(run_agent_once(srv, run)))
    finally:
        srv.stop()
    blocks = BATCHES * EVENTS_PER_BATCH * BLOCKS_PER_EVENT
    print(f"\nagent throughput: {RUNS} runs of {BATCHES} engine batches = {blocks:,} block "
          f"events ({EVENTS_PER_BATCH} BlockStored x {BLOCKS_PER_EVENT} blocks per batch)")
    print(f"  ZMQ -> agent -> NATS   block events/s  {_summary(agent_rates)}")
    print(f"  baseline: NATS only    block events/s  {_summary(base_rates)}")
    print(f"  agent / baseline (medians): "
          f"{statistics.median(agent_rates) / statistics.median(base_rates):.2f}")
    out = os.environ.get("BENCH_OUT")
    if out:
        with open(out, "wb") as f:
            f.write(msgspec.json.encode({"agent_block_events_per_s": agent_rates,
                                         "baseline_block_events_per_s": base_rates,
                                         "blocks_per_run": blocks}))
