"""100k block events from a real simulator through the agent to NATS, none lost or reordered."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import zmq
import zmq.asyncio

from infermesh.libs.bus import connect
from infermesh.proto.messages import AllBlocksCleared, BlockRemoved, BlockStored
from infermesh.proto.vllm_kv import VllmEventDecoder

from .helpers import (
    SIM_BLOCK_SIZE,
    BusWatcher,
    complete_ids,
    random_prompt,
    sim_cache,
    wait_until,
    zmq_replay,
)

BS = SIM_BLOCK_SIZE
TARGET = 100_000


def flat(events) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for e in events:
        if isinstance(e, (BlockStored, BlockRemoved)):
            out.append((type(e).__name__, tuple(e.block_hashes)))
        else:
            out.append((type(e).__name__, ()))
    return out


async def test_100k_block_events_pass_through_without_loss(nats_server, procs):
    # A cache of 2,000 blocks and 1,024-token prompts: every request stores 64 blocks and,
    # once full, evicts 64, so ~800 requests make over 100k block events.
    _, info = procs.sim("--time-scale", "0", "--num-gpu-blocks", "2000",
                        "--replay-buffer-steps", "200000")
    eng = info["engines"][0]
    nc = await connect(nats_server.url, "test")
    watch = await BusWatcher(nc).start()
    procs.agent(nats_server.url, eng, "pod-v")
    await wait_until(lambda: "pod-v" in watch.states and watch.states["pod-v"].ready,
                     what="agent ready")
    view = watch.view("pod-v")
    rng = random.Random(11)
    sent = 0

    async def worker(http: aiohttp.ClientSession, n: int) -> None:
        nonlocal sent
        for _ in range(n):
            await complete_ids(http, eng["http"], random_prompt(rng, 64 * BS), max_tokens=1)
            sent += 1

    async with aiohttp.ClientSession() as http:
        while view.block_events < TARGET:
            await asyncio.gather(*(worker(http, 25) for _ in range(4)))
            await wait_until(lambda: view.block_events >= (sent - 60) * 64, timeout=60,
                             what="agent keeping up")
        cache = set((await sim_cache(http, eng["http"]))["GPU"])
        await wait_until(lambda: view.gpu == cache, timeout=60, what="bus view == engine cache")

    # Ground truth: the engine's whole stream, from its replay buffer.
    ctx = zmq.asyncio.Context()
    try:
        msgs = await zmq_replay(ctx, eng["replay"], timeout=30)
    finally:
        ctx.term()
    dec = VllmEventDecoder()
    engine_events = [e for _t, _s, p in msgs[:-1] for e in dec.decode(p).events]
    bus_events = [e for b in view.batches for e in b.events]
    # The agent opens its stream with one AllBlocksCleared (its start-up sync), then mirrors.
    assert isinstance(bus_events[0], AllBlocksCleared)
    assert flat(bus_events[1:]) == flat(engine_events)
    assert view.block_events >= TARGET
    (epoch,) = view.epochs()
    seqs = view.seqs(epoch)
    assert seqs == list(range(1, len(seqs) + 1))
    assert watch.bad == 0
    print(f"requests={sent} block_events={view.block_events} engine_batches={len(msgs) - 1} "
          f"bus_batches={len(view.batches)}")
    await nc.close()
