"""The simulator's KV events, read as a vLLM consumer would: ZMQ framing, both event forms,
block hashes as vLLM computes them, and a stream that reproduces the engine's cache."""

from __future__ import annotations

import random

import aiohttp
import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from infermesh.services.sim.block_hash import BlockHasher, to_wire

from . import vllm_reference as ref
from .helpers import SIM_BLOCK_SIZE, complete_ids, random_prompt, sim_cache, zmq_replay

BS = SIM_BLOCK_SIZE


@pytest.mark.parametrize("form", ["map", "array"])
async def test_events_decode_with_vllm_definitions(procs, form: str) -> None:
    _, info = procs.sim("--event-form", form, "--time-scale", "0", "--num-gpu-blocks", "40",
                        "--hash-seed", "0")
    eng = info["engines"][0]
    rng = random.Random(1)
    shared = random_prompt(rng, 5 * BS)
    prompts = [shared + random_prompt(rng, 3 * BS + 5) for _ in range(3)]
    prompts += [random_prompt(rng, 6 * BS) for _ in range(6)]  # overflow 40 blocks: evictions
    async with aiohttp.ClientSession() as http:
        for p in prompts:
            await complete_ids(http, eng["http"], p, max_tokens=1)
        cache = await sim_cache(http, eng["http"])

    ctx = zmq.asyncio.Context()
    try:
        msgs = await zmq_replay(ctx, eng["replay"])
    finally:
        ctx.term()
    # vLLM 0.32 replay framing: [topic, seq, payload] per batch, then [b"", END, b""].
    *batches, end = msgs
    assert end == [b"", b"\xff" * 8, b""]
    assert [int.from_bytes(m[1], "big") for m in batches] == list(range(len(batches)))
    assert all(m[0] == eng["topic"].encode() for m in batches)

    hasher = BlockHasher("sha256", "0")
    gpu: set[int] = set()
    stored_chains: list[list[int]] = []
    removed = 0
    for _topic, _seq, payload in batches:
        batch = ref.decode(payload, form)
        assert batch.data_parallel_rank == 0
        for ev in batch.events:
            k = ref.kind(ev)
            if k == "BlockStored":
                assert ev.block_size == BS and len(ev.token_ids) == BS * len(ev.block_hashes)
                assert ev.medium == "GPU"
                # vLLM 0.32 publishes one (untagged) extra-key entry per block, None here.
                assert ev.extra_keys == [None] * len(ev.block_hashes)
                assert all(isinstance(h, int) and 0 <= h < 2**64 for h in ev.block_hashes)
                gpu.update(ev.block_hashes)
                stored_chains.append(ev.block_hashes)
            elif k == "BlockRemoved":
                removed += len(ev.block_hashes)
                gpu.difference_update(ev.block_hashes)
    assert removed > 0, "the small cache should have evicted blocks"
    assert gpu == set(cache["GPU"])
    # The first prompt's blocks carry exactly the hashes vLLM computes (sha256, seed "0").
    expect = [to_wire(h) for h in hasher.hash_prompt(prompts[0], BS)]
    assert stored_chains[0] == expect
    # The second prompt reuses the shared prefix: its first stored block chains to it.
    expect2 = [to_wire(h) for h in hasher.hash_prompt(prompts[1], BS)]
    assert stored_chains[1] == expect2[5:]


async def test_live_pub_frames(procs) -> None:
    _, info = procs.sim("--time-scale", "0")
    eng = info["engines"][0]
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    mon = sub.get_monitor_socket(zmq.EVENT_CONNECTED)
    sub.connect(eng["kv"])
    try:
        ev = parse_monitor_message(await mon.recv_multipart())
        assert ev["event"] == zmq.EVENT_CONNECTED
        rng = random.Random(2)
        async with aiohttp.ClientSession() as http:
            # PUB/SUB needs the subscription to reach the publisher; retry until a batch lands.
            for _ in range(100):
                await complete_ids(http, eng["http"], random_prompt(rng, 2 * BS))
                if await sub.poll(100):
                    break
        topic, seq, payload = await sub.recv_multipart()
        assert topic == eng["topic"].encode() and len(seq) == 8
        assert ref.kind(ref.decode(payload, "map").events[0]) == "BlockStored"
    finally:
        sub.disable_monitor()
        mon.close(0)
        sub.close(0)
        ctx.term()
