"""The agent between a real simulator process and a real nats-server: every block reaches the
bus, snapshots match the engine, and restarts of either side leave the right block set."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from infermesh.libs.bus import NatsServer, connect, request_parts
from infermesh.libs.process.ports import free_port_range
from infermesh.proto.messages import BlockStored, Snapshot, SnapshotRequest

from .helpers import (
    SIM_BLOCK_SIZE,
    BusWatcher,
    complete_ids,
    random_prompt,
    sim_cache,
    wait_until,
)

BS = SIM_BLOCK_SIZE


async def snapshot(nc, pod: str) -> tuple[set[int], list[Snapshot]]:
    parts = await request_parts(nc, f"im.snapshot.{pod}",
                                SnapshotRequest(pod=pod, max_blocks_per_part=50), Snapshot,
                                parts_of=lambda s: (s.part, s.parts), timeout=5)
    blocks = {b.block_hash for p in parts for b in p.blocks if "GPU" in b.tiers}
    return blocks, parts


async def traffic(http, base: str, rng: random.Random, n: int, shared: list[int]) -> None:
    for i in range(n):
        prefix = shared if i % 2 else []
        await complete_ids(http, base, prefix + random_prompt(rng, rng.randrange(1, 6) * BS + 3),
                           max_tokens=rng.randrange(1, 40))


async def test_every_block_reaches_the_bus_and_survives_an_agent_restart(nats_server, procs):
    _, info = procs.sim("--time-scale", "0", "--num-gpu-blocks", "120")
    eng = info["engines"][0]
    nc = await connect(nats_server.url, "test")
    watch = await BusWatcher(nc).start()
    agent = procs.agent(nats_server.url, eng, "pod-a")
    await wait_until(lambda: "pod-a" in watch.states and watch.states["pod-a"].ready,
                     what="first ready heartbeat")
    rng = random.Random(7)
    shared = random_prompt(rng, 4 * BS)
    async with aiohttp.ClientSession() as http:
        await traffic(http, eng["http"], rng, 60, shared)
        cache = set((await sim_cache(http, eng["http"]))["GPU"])
        view = watch.view("pod-a")
        await wait_until(lambda: view.gpu == cache, what="bus view == engine cache")
        assert view.block_events > 300  # evictions happened too
        (epoch,) = view.epochs()
        assert view.seqs(epoch) == list(range(1, len(view.seqs(epoch)) + 1)), "gapless seq"
        snap, parts = await snapshot(nc, "pod-a")
        assert snap == cache and len(parts) > 1 and parts[0].epoch == epoch
        assert parts[0].seq == view.seqs(epoch)[-1] and parts[0].block_size == BS
        # Parents come before children in a snapshot.
        seen: set[int] = set()
        for b in (b for p in parts for b in p.blocks):
            assert b.parent_hash is None or b.parent_hash in seen or b.parent_hash not in snap
            seen.add(b.block_hash)
        hb = watch.states["pod-a"]
        assert hb.block_size == BS and hb.num_gpu_blocks == 120 and hb.ready

        # kill -9 the agent; a new one rebuilds the full block set from the replay buffer.
        agent.kill()
        procs.agent(nats_server.url, eng, "pod-a")
        await wait_until(lambda: watch.states["pod-a"].epoch != epoch, what="new agent")
        snap2, parts2 = await snapshot(nc, "pod-a")
        assert snap2 == cache and parts2[0].epoch != epoch
        # More traffic after the restart still flows and the bus view follows it.
        await traffic(http, eng["http"], rng, 10, shared)
        cache2 = set((await sim_cache(http, eng["http"]))["GPU"])
        await wait_until(lambda: view.gpu == cache2, what="bus view after agent restart")
    await nc.close()


async def test_a_prompt_over_the_bus_payload_reaches_the_bus_in_chained_parts(procs):
    """One long prompt stores more blocks than one bus message holds (nats-server's default
    1 MiB): the agent splits its BlockStored into chained parts, and loses nothing."""
    srv = NatsServer().start()
    try:
        _, info = procs.sim("--time-scale", "0", "--max-model-len", "500000",
                            "--num-gpu-blocks", "40000")
        eng = info["engines"][0]
        nc = await connect(srv.url, "test")
        watch = await BusWatcher(nc).start()
        procs.agent(srv.url, eng, "pod-big")
        await wait_until(lambda: "pod-big" in watch.states and watch.states["pod-big"].ready,
                         what="first ready heartbeat")
        ids = random_prompt(random.Random(3), 400_000)
        async with aiohttp.ClientSession() as http:
            await complete_ids(http, eng["http"], ids, max_tokens=1)
            cache = set((await sim_cache(http, eng["http"]))["GPU"])
        assert len(cache) >= len(ids) // BS
        view = watch.view("pod-big")
        await wait_until(lambda: view.gpu == cache, what="every block of the long prompt")
        (epoch,) = view.epochs()
        assert view.seqs(epoch) == list(range(1, len(view.seqs(epoch)) + 1)), "gapless seq"
        stored = [ev for b in view.batches for ev in b.events if isinstance(ev, BlockStored)]
        assert len(stored) > 1
        # Chained: each part's parent is the last block of the part before it.
        for a, b in zip(stored, stored[1:], strict=False):
            assert b.parent_hash == a.block_hashes[-1]
        assert all(len(ev.token_ids) == len(ev.block_hashes) * BS for ev in stored)
        await nc.close()
    finally:
        srv.stop()


async def test_engine_restart_replaces_the_blocks(nats_server, procs):
    http_port, kv_port = free_port_range(1), free_port_range(2)
    args = ("--time-scale", "0", "--http-port", str(http_port), "--kv-port", str(kv_port))
    sim, info = procs.sim(*args)
    eng = info["engines"][0]
    nc = await connect(nats_server.url, "test")
    watch = await BusWatcher(nc).start()
    procs.agent(nats_server.url, eng, "pod-b")
    await wait_until(lambda: "pod-b" in watch.states and watch.states["pod-b"].ready,
                     what="first ready heartbeat")
    rng = random.Random(8)
    view = watch.view("pod-b")
    async with aiohttp.ClientSession() as http:
        await traffic(http, eng["http"], rng, 20, random_prompt(rng, 2 * BS))
        old = set((await sim_cache(http, eng["http"]))["GPU"])
        await wait_until(lambda: view.gpu == old, what="bus view of the first engine")
        sim.kill()
        cleared_before = view.cleared
        _, info2 = procs.sim(*args)
        assert info2["engines"][0]["kv"] == eng["kv"]
    async with aiohttp.ClientSession() as http:  # the old keep-alive connections died
        await traffic(http, eng["http"], rng, 5, random_prompt(rng, 2 * BS))
        new = set((await sim_cache(http, eng["http"]))["GPU"])
        assert new and not (new & old)
        await wait_until(lambda: view.gpu == new, what="bus view replaced by the new engine")
        assert view.cleared > cleared_before
        snap, _ = await snapshot(nc, "pod-b")
        assert snap == new
    await nc.close()


@pytest.mark.parametrize("form", ["array"])
async def test_agent_reads_the_positional_form(nats_server, procs, form):
    _, info = procs.sim("--time-scale", "0", "--event-form", form)
    eng = info["engines"][0]
    nc = await connect(nats_server.url, "test")
    watch = await BusWatcher(nc).start()
    procs.agent(nats_server.url, eng, "pod-c")
    await wait_until(lambda: "pod-c" in watch.states and watch.states["pod-c"].ready,
                     what="first ready heartbeat")
    rng = random.Random(9)
    async with aiohttp.ClientSession() as http:
        await traffic(http, eng["http"], rng, 10, [])
        cache = set((await sim_cache(http, eng["http"]))["GPU"])
    view = watch.view("pod-c")
    await wait_until(lambda: view.gpu == cache and len(cache) > 0, what="bus view")
    await nc.close()


async def test_heartbeat_reports_load_and_lora(nats_server, procs):
    _, info = procs.sim("--time-scale", "0.1", "--loras", "ad1", "--max-loras", "3",
                        "--num-gpu-blocks", "500", "--max-num-seqs", "2")
    eng = info["engines"][0]
    nc = await connect(nats_server.url, "test")
    watch = await BusWatcher(nc).start()
    procs.agent(nats_server.url, eng, "pod-l", "--labels", "zone=z1", "--role", "decode")
    await wait_until(lambda: "pod-l" in watch.states and watch.states["pod-l"].ready,
                     what="first ready heartbeat")
    st = watch.states["pod-l"]
    assert st.model == "infermesh/tiny-llama" and st.url == eng["http"]
    assert st.lora.max_lora == 3 and st.labels == {"zone": "z1"} and st.role == "decode"
    assert st.num_gpu_blocks == 500 and st.block_size == BS
    rng = random.Random(3)
    async with aiohttp.ClientSession() as http:
        # Four slow requests (~1.4 s each) on a 2-sequence engine: 2 run, 2 wait.
        reqs = [asyncio.create_task(complete_ids(http, eng["http"], random_prompt(rng, 40),
                                                 max_tokens=2000, model="ad1"))
                for _ in range(4)]
        await wait_until(lambda: watch.states["pod-l"].running == 2
                         and watch.states["pod-l"].waiting == 2, what="load in the heartbeat")
        st = watch.states["pod-l"]
        assert st.kv_usage > 0 and st.lora.running == ["ad1"]
        await asyncio.gather(*reqs)
    await wait_until(lambda: watch.states["pod-l"].running == 0, what="load gone")
    assert watch.states["pod-l"].prefix_cache_queries >= 160
    await nc.close()


async def test_agent_survives_a_bus_restart(procs, tmp_path):
    from infermesh.libs.bus import NatsServer

    srv = NatsServer()
    srv.start()
    try:
        _, info = procs.sim("--time-scale", "0")
        eng = info["engines"][0]
        agent = procs.agent(srv.url, eng, "pod-n")
        nc = await connect(srv.url, "test")
        watch = await BusWatcher(nc).start()
        await wait_until(lambda: "pod-n" in watch.states and watch.states["pod-n"].ready,
                         what="first ready heartbeat")
        rng = random.Random(5)
        async with aiohttp.ClientSession() as http:
            await traffic(http, eng["http"], rng, 5, [])
            srv.kill()  # the bus goes away
            await wait_until(lambda: not nc.is_connected, what="test client disconnected")
            await traffic(http, eng["http"], rng, 5, [])  # engine keeps working meanwhile
            srv2 = NatsServer(srv.port)
            srv2.start()
            try:
                await wait_until(lambda: nc.is_connected, timeout=30, what="test reconnected")
                seen = watch.states["pod-n"].ts
                await wait_until(lambda: watch.states["pod-n"].ts > seen, timeout=30,
                                 what="heartbeats after the bus came back")
                await traffic(http, eng["http"], rng, 5, [])
                cache = set((await sim_cache(http, eng["http"]))["GPU"])
                # A consumer that missed the outage repairs itself with a snapshot.
                await wait_until(lambda: watch.view("pod-n").seqs(
                    watch.view("pod-n").epochs()[-1])[-1] == watch.states["pod-n"].kv_seq,
                    what="stream caught up with the heartbeat's kv_seq")
                snap, _ = await snapshot(nc, "pod-n")
                assert snap == cache
                assert agent.alive()
            finally:
                await nc.close()
                srv2.stop()
    finally:
        srv.stop()
