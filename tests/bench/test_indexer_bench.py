"""Benchmark: indexer ingest (blocks/s) and lookup latency (512-block prompt, 64 pods).

Nothing about time is asserted: medians and tails are printed next to baselines measured in the
same process on the same nats-server:

* ingest into the index directly, and over the bus into a running indexer, against a subscriber
  that only decodes the same batches (what the bus and decoding cost before any indexing);
* lookup handler time in the index, and the round trip of ``im.index.lookup``, against echo
  endpoints that decode the same request and answer an empty reply (the bus round trip alone)
  or a copy of the indexer's reply (the bus round trip with the reply's size, no index work).

Run with `make bench` (or `pytest -m bench -s tests/bench/test_indexer_bench.py`).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import statistics
import time

import pytest

from infermesh.libs import kvblock
from infermesh.libs.bus import BusService, NatsServer, connect, request
from infermesh.libs.kvindex import KVIndex
from infermesh.proto import codec
from infermesh.proto.messages import (
    BlockStored,
    KVEventBatch,
    LookupReply,
    LookupRequest,
)
from infermesh.services.indexer.config import IndexerConfig
from infermesh.services.indexer.service import IndexerService

pytestmark = pytest.mark.bench

RUNS = int(os.environ.get("BENCH_INDEXER_RUNS", "5"))
LOOKUPS = int(os.environ.get("BENCH_INDEXER_LOOKUPS", "2000"))
PODS = 64
PROMPT_BLOCKS = 512
BS = 16
MODEL = "bench-model"
BATCHES_PER_POD = 40
EVENTS_PER_BATCH = 4
BLOCKS_PER_EVENT = 8  # 64 pods × 40 batches × 32 blocks = 81,920 blocks per run


def ingest_batches(rng: random.Random, epoch: str) -> list[KVEventBatch]:
    """Every pod's stream: chains of new blocks (with their tokens), in seq order per pod."""
    out = []
    for p in range(PODS):
        for seq in range(1, BATCHES_PER_POD + 1):
            events = []
            for _ in range(EVENTS_PER_BATCH):
                base = rng.randrange(1 << 62)
                events.append(BlockStored(
                    block_hashes=[base + i for i in range(BLOCKS_PER_EVENT)],
                    token_ids=[rng.randrange(30_000) for _ in range(BLOCKS_PER_EVENT * BS)],
                    block_size=BS))
            out.append(KVEventBatch(pod=f"pod{p}", pool="default", epoch=epoch, seq=seq, ts=0.0,
                                    events=events, model=MODEL))
    # Interleave the pods, as many agents publishing at once would.
    return [out[p * BATCHES_PER_POD + s] for s in range(BATCHES_PER_POD) for p in range(PODS)]


BLOCKS_PER_RUN = PODS * BATCHES_PER_POD * EVENTS_PER_BATCH * BLOCKS_PER_EVENT


def prompt_batches(rng: random.Random) -> tuple[list[int], list[KVEventBatch]]:
    """One 512-block prompt; each pod holds a prefix of it (some all of it, some part on CPU)."""
    toks = [rng.randrange(30_000) for _ in range(PROMPT_BLOCKS * BS)]
    keys = kvblock.prompt_keys(MODEL, toks, BS)
    out = []
    for p in range(PODS):
        n = PROMPT_BLOCKS if p % 4 == 0 else rng.randrange(1, PROMPT_BLOCKS + 1)
        hashes = [(p << 20) + i for i in range(n)]
        events: list = [BlockStored(block_hashes=hashes, token_ids=toks[: n * BS], block_size=BS)]
        if p % 8 == 1:
            events.append(BlockStored(block_hashes=hashes[n // 2 :], tier="CPU"))
        out.append(KVEventBatch(pod=f"pod{p}", pool="default", epoch="e", seq=1, ts=0.0,
                                events=events, model=MODEL))
    return keys, out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def fmt_us(xs: list[float]) -> str:
    return f"p50 {pct(xs, 0.5) * 1e6:8.1f} µs   p99 {pct(xs, 0.99) * 1e6:8.1f} µs"


def spread(xs: list[float]) -> str:
    return (f"median {statistics.median(xs):>10,.0f}   min {min(xs):>10,.0f}   "
            f"max {max(xs):>10,.0f}")


# ---------------------------------------------------------------------------- ingest


def ingest_direct(batches: list[KVEventBatch]) -> float:
    idx = KVIndex()
    t0 = time.perf_counter()
    for b in batches:
        idx.apply(b.pod, b.model, b.events)
    dt = time.perf_counter() - t0
    assert idx.entries == BLOCKS_PER_RUN
    return BLOCKS_PER_RUN / dt


async def ingest_over_bus(srv: NatsServer, payloads: list[bytes], run: int) -> tuple[float, float]:
    """(indexer blocks/s, decode-only subscriber blocks/s) for the same published batches."""
    pub = await connect(srv.url, "bench-pub")
    # Baseline: a subscriber that decodes each batch and counts its blocks, nothing else.
    counted = 0
    done = asyncio.Event()

    async def on_msg(msg) -> None:  # type: ignore[no-untyped-def]
        nonlocal counted
        b = codec.decode(msg.data, KVEventBatch)
        counted += sum(len(e.block_hashes) for e in b.events)  # type: ignore[union-attr]
        if counted >= BLOCKS_PER_RUN:
            done.set()

    sub_nc = await connect(srv.url, "bench-sub")
    await sub_nc.subscribe(f"bench{run}.kv.*.*", cb=on_msg, pending_msgs_limit=1_000_000,
                           pending_bytes_limit=1 << 30)
    await sub_nc.flush()
    t0 = time.perf_counter()
    for data in payloads:
        await pub.publish(f"bench{run}.kv.default.x", data)
    await pub.flush()
    await done.wait()
    base = BLOCKS_PER_RUN / (time.perf_counter() - t0)
    await sub_nc.close()

    cfg = IndexerConfig(nats_url=srv.url, subject_prefix=f"idx{run}", http_port=-1,
                        pod_timeout_s=3600)
    indexer = IndexerService(cfg)
    await indexer.start()
    subjects = [f"idx{run}.kv.default.{codec.decode(d, KVEventBatch).pod}" for d in payloads]
    stats = indexer.index.stats
    t0 = time.perf_counter()
    for subj, data in zip(subjects, payloads, strict=True):
        await pub.publish(subj, data)
    await pub.flush()
    while stats.blocks_stored < BLOCKS_PER_RUN:
        await asyncio.sleep(0.001)
    rate = BLOCKS_PER_RUN / (time.perf_counter() - t0)
    assert indexer.index.entries == BLOCKS_PER_RUN and not indexer.tracker.syncing()
    await indexer.stop()
    await pub.close()
    return rate, base


# ---------------------------------------------------------------------------- lookups


def lookups_direct(keys: list[int], batches: list[KVEventBatch]) -> list[float]:
    idx = KVIndex()
    for b in batches:
        idx.apply(b.pod, b.model, b.events)
    assert len(idx.lookup(keys)) == PODS
    gc.collect()
    gc.freeze()  # as the service does after start-up: only the lookups' own garbage is scanned
    out = []
    for _ in range(LOOKUPS):
        t0 = time.perf_counter()
        idx.lookup(keys)
        out.append(time.perf_counter() - t0)
    gc.unfreeze()
    return out


async def lookups_over_bus(srv: NatsServer, keys: list[int],
                           batches: list[KVEventBatch],
                           ) -> tuple[list[float], list[float], list[float], int]:
    """Round trips of the indexer, of an empty echo and of an echo of the indexer's reply."""
    cfg = IndexerConfig(nats_url=srv.url, subject_prefix="lk", http_port=-1, pod_timeout_s=3600)
    indexer = IndexerService(cfg)
    await indexer.start()
    nc = await connect(srv.url, "bench-lookup")
    for b in batches:
        await nc.publish(f"lk.kv.default.{b.pod}", codec.encode(b))
    await nc.flush()
    while indexer.index.entries < sum(len(b.events[0].block_hashes) for b in batches):  # type: ignore[union-attr]
        await asyncio.sleep(0.005)

    req = LookupRequest(model=MODEL, block_keys=keys)
    reply = await request(nc, "lk.index.lookup", req, LookupReply, timeout=5)
    assert len(reply.matches) == PODS
    size = len(codec.encode(reply))

    async def echo(_: LookupRequest) -> LookupReply:
        return LookupReply(matches=[])

    async def echo_full(_: LookupRequest) -> LookupReply:
        return reply

    svc = BusService(nc, "bench-echo")
    svc.endpoint("echo", "bench.echo", LookupRequest, echo)
    svc.endpoint("echo_full", "bench.echo_full", LookupRequest, echo_full)
    await svc.start()
    gc.collect()
    gc.freeze()  # as the service does after start-up: only the lookups' own garbage is scanned
    times: dict[str, list[float]] = {"lk.index.lookup": [], "bench.echo": [],
                                     "bench.echo_full": []}
    for _ in range(LOOKUPS):
        for subject, out in times.items():  # interleaved: the same conditions for both
            t0 = time.perf_counter()
            await request(nc, subject, req, LookupReply, timeout=5)
            out.append(time.perf_counter() - t0)
    await svc.stop()
    await indexer.stop()
    await nc.close()
    gc.unfreeze()
    return times["lk.index.lookup"], times["bench.echo"], times["bench.echo_full"], size


async def test_indexer_ingest_and_lookup() -> None:
    rng = random.Random(0)
    srv = NatsServer(max_payload=8 * 1024 * 1024).start()
    try:
        direct, bus, base = [], [], []
        for run in range(RUNS):
            batches = ingest_batches(rng, f"e{run}")
            direct.append(ingest_direct(batches))
            rate, b = await ingest_over_bus(srv, [codec.encode(x) for x in batches], run)
            bus.append(rate)
            base.append(b)
        del batches
        keys, pbatches = prompt_batches(rng)
        handler = lookups_direct(keys, pbatches)
        rt, echo, echo_full, size = await lookups_over_bus(srv, keys, pbatches)
    finally:
        srv.stop()
    print()
    print(f"indexer ingest, blocks/s ({BLOCKS_PER_RUN:,} blocks with tokens, {PODS} pods, "
          f"{RUNS} runs)")
    print(f"  KVIndex.apply directly             {spread(direct)}")
    print(f"  over the bus into the indexer      {spread(bus)}")
    print(f"  baseline: bus + decode only        {spread(base)}")
    print(f"lookup, {PROMPT_BLOCKS}-block prompt, {PODS} pods matching ({LOOKUPS} lookups, "
          f"reply {size:,} bytes)")
    print(f"  KVIndex.lookup (handler time)      {fmt_us(handler)}")
    print(f"  im.index.lookup round trip         {fmt_us(rt)}")
    print(f"  baseline: echo, empty reply        {fmt_us(echo)}")
    print(f"  baseline: echo, the same reply     {fmt_us(echo_full)}")
