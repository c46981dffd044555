"""The simulator's shared-storage KV tier across real processes: engine A writes a prompt's
blocks to the directory and announces them on ZMQ as vLLM does (medium STORAGE, placeholders);
engine B, another process on the same directory with a cold GPU, answers the same prompt from
disk; capacity eviction announces removals; bad files are misses; concurrent writers leave good
files; the pool's storage in the index credits every pod."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
from pathlib import Path
from typing import Any

import aiohttp
import zmq
import zmq.asyncio

from infermesh.libs import kvblock
from infermesh.libs.bus import connect, request
from infermesh.libs.kvstore import BlockStore
from infermesh.libs.process.ports import free_port
from infermesh.proto.messages import (
    TIER_SHARED,
    BlockRemoved,
    BlockStored,
    LookupReply,
    LookupRequest,
)
from infermesh.proto.vllm_kv import VllmEventDecoder
from infermesh.services.sim.block_hash import BlockHasher, to_wire

from . import vllm_reference as ref
from .helpers import (
    SIM_BLOCK_SIZE,
    complete_ids,
    random_prompt,
    sim_cache,
    wait_healthy,
    wait_until,
    zmq_replay,
)

BS = SIM_BLOCK_SIZE


def _sim(procs: Any, storage: Path, *extra: str) -> dict[str, Any]:
    _, info = procs.sim("--time-scale", "0", "--hash-seed", "0", "--storage-dir", str(storage),
                        *extra)
    return info["engines"][0]  # type: ignore[no-any-return]


async def _metric(http: aiohttp.ClientSession, base: str, name: str, **labels: str) -> float:
    async with http.get(f"{base}/metrics") as r:
        text = await r.text()
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in want):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _replay(endpoint: str) -> list[bytes]:
    ctx = zmq.asyncio.Context()
    try:
        msgs = await zmq_replay(ctx, endpoint)
    finally:
        ctx.term()
    return [m[2] for m in msgs[:-1]]


async def _storage_files(http: aiohttp.ClientSession, base: str) -> list[int]:
    return (await sim_cache(http, base))["STORAGE"]  # type: ignore[no-any-return]


def _block_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.kv") if not p.name.startswith(".")]


async def test_engine_b_serves_engine_a_prompt_from_disk(procs, tmp_path: Path) -> None:
    storage = tmp_path / "kv"
    a = _sim(procs, storage)
    rng = random.Random(7)
    prompt = random_prompt(rng, 30 * BS + 5)
    expect = [to_wire(h) for h in BlockHasher("sha256", "0").hash_prompt(prompt, BS)]
    async with aiohttp.ClientSession() as http:
        first = await complete_ids(http, a["http"], prompt)
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        await wait_until(lambda: _count(http, a["http"], 30), what="30 files in storage")
        assert sorted(await _storage_files(http, a["http"])) == sorted(expect[:30])
    assert len(_block_files(storage)) == 30

    # A's STORAGE events, in vLLM's wire form (its own definitions) and as the agent reads them
    payloads = await _replay(a["replay"])
    raw = [e for p in payloads for e in ref.decode(p, "map").events
           if ref.kind(e) == "BlockStored" and e.medium == "STORAGE"]
    assert [e.block_hashes for e in raw] == [[h] for h in expect[:30]]
    assert all(e.token_ids == [] and e.block_size == 0 and e.parent_block_hash is None
               and e.locality == "REMOTE" and e.group_idx == 0 for e in raw)
    decoder = VllmEventDecoder()
    ours = [e for p in payloads for e in decoder.decode(p).events
            if isinstance(e, BlockStored) and e.tier == TIER_SHARED]
    assert len(ours) == 30 and all(e.token_ids == [] for e in ours)

    # B: another process on the same directory, its GPU cold
    b = _sim(procs, storage)
    async with aiohttp.ClientSession() as http:
        second = await complete_ids(http, b["http"], prompt)
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 30 * BS
        m = "vllm:prompt_tokens_cached_by_source_total"
        assert await _metric(http, b["http"], m, source="disk") == 30 * BS
        assert await _metric(http, b["http"], m, source="device") == 0
        assert await _metric(http, b["http"], "vllm:kv_offload_tiering_chunk_hits_total",
                             tier="1:fs") == 30
        read = await _metric(http, b["http"], "vllm:kv_offload_tiering_read_bytes_total",
                             tier="1:fs")
        assert read == 30 * BS * 131_072
        # B loaded them; it stores nothing again
        cache = await sim_cache(http, b["http"])
        assert cache["storage"]["writes"] == 0 and cache["storage"]["reads"] == 30


async def _count(http: aiohttp.ClientSession, base: str, n: int) -> bool:
    return len(await _storage_files(http, base)) == n


async def test_capacity_eviction_announces_removals(procs, tmp_path: Path) -> None:
    storage = tmp_path / "kv"
    per_file = 4096 + 24 + 32  # payload, header, key
    a = _sim(procs, storage, "--storage-capacity-bytes", str(12 * per_file))
    rng = random.Random(8)
    async with aiohttp.ClientSession() as http:
        for k in range(1, 5):  # 4 × 6 blocks into room for 12
            await complete_ids(http, a["http"], random_prompt(rng, 6 * BS + 1))
            await wait_until(lambda k=k: _writes(http, a["http"], 6 * k), what="the writes")
            # file times tick coarsely: the next prompt's files must be strictly newer
            newest = max(f.stat().st_mtime_ns for f in _block_files(storage))
            await wait_until(lambda n=newest: _fs_now_ns(tmp_path) > n, what="a clock tick",
                             interval=0.001)
        left = set(await _storage_files(http, a["http"]))
    assert len(left) <= 12 and len(_block_files(storage)) == len(left)
    decoder = VllmEventDecoder()
    stored: list[int] = []
    removed: list[int] = []
    for p in await _replay(a["replay"]):
        for e in decoder.decode(p).events:
            if isinstance(e, BlockStored) and e.tier == TIER_SHARED:
                stored += e.block_hashes
            elif isinstance(e, BlockRemoved) and e.tier == TIER_SHARED:
                removed += e.block_hashes
    assert len(stored) == 24
    # least recently used first: past 12 files, down to 10, three at a time; the first two
    # prompts' blocks went, the last two's stay
    assert sorted(removed) == sorted(stored[:12]) and left == set(stored[12:])


def _fs_now_ns(where: Path) -> int:
    """The filesystem's clock: the time it stamps on a file written now."""
    probe = where / "clock-probe"
    probe.write_bytes(b"")
    return probe.stat().st_mtime_ns


async def _writes(http: aiohttp.ClientSession, base: str, n: int) -> bool:
    return bool((await sim_cache(http, base))["storage"]["writes"] >= n)


async def test_corrupt_and_truncated_files_are_recomputed(procs, tmp_path: Path) -> None:
    storage = tmp_path / "kv"
    a = _sim(procs, storage)
    rng = random.Random(9)
    prompt = random_prompt(rng, 12 * BS + 1)
    hashes = BlockHasher("sha256", "0").hash_prompt(prompt, BS)
    async with aiohttp.ClientSession() as http:
        await complete_ids(http, a["http"], prompt)
        await wait_until(lambda: _count(http, a["http"], 12), what="12 files")
        ns = (await sim_cache(http, a["http"]))["storage"]["dir"]
    files = BlockStore(storage, Path(ns).name)
    bad = files.path(hashes[5])  # a flipped payload byte
    raw = bytearray(bad.read_bytes())
    raw[-100] ^= 0x01
    bad.write_bytes(bytes(raw))
    short = files.path(hashes[9])  # cut short, as by a writer that died without renaming
    short.write_bytes(short.read_bytes()[:1000])

    b = _sim(procs, storage)
    async with aiohttp.ClientSession() as http:
        got = await complete_ids(http, b["http"], prompt)
        assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == 5 * BS
        st = (await sim_cache(http, b["http"]))["storage"]
        assert st["corrupt"] == 1 and st["reads"] == 5
        assert await _metric(http, b["http"],
                             "vllm:kv_offload_tiering_promotion_job_failures_total",
                             tier="1:fs") == 1
        # B recomputed blocks 5.. and wrote the missing one back; the truncated one is
        # still bad until a lookup reaches it
        await wait_until(lambda: bad.exists(), what="block 5 rewritten")
    c = _sim(procs, storage)
    async with aiohttp.ClientSession() as http:
        got = await complete_ids(http, c["http"], prompt)
        assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == 9 * BS
        assert (await sim_cache(http, c["http"]))["storage"]["corrupt"] == 1
    assert files.get(hashes[5]) is not None  # the rewritten file verifies


async def test_two_engines_writing_the_same_blocks(procs, tmp_path: Path) -> None:
    storage = tmp_path / "kv"
    a = _sim(procs, storage)
    b = _sim(procs, storage)
    rng = random.Random(10)
    prompts = [random_prompt(rng, 16 * BS + 1) for _ in range(4)]
    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(complete_ids(http, e["http"], p)
                               for p in prompts for e in (a, b)))
        await wait_until(lambda: _count(http, a["http"], 64), what="64 files")
        ns = Path((await sim_cache(http, a["http"]))["storage"]["dir"]).name
        wa = (await sim_cache(http, a["http"]))["storage"]["writes"]
        wb = (await sim_cache(http, b["http"]))["storage"]["writes"]
    assert wa + wb >= 64
    files = BlockStore(storage, ns)
    hasher = BlockHasher("sha256", "0")
    want = {h for p in prompts for h in hasher.hash_prompt(p, BS)[:16]}
    assert set(files.keys()) == want
    assert all(files.get(h) is not None for h in want)
    assert files.stats.corrupt == 0
    assert not [p for p in storage.rglob(".tmp-*")]


def _put_many(root: str, ns: str, keys: list[bytes], start: Any) -> int:
    store = BlockStore(root, ns)
    start.wait()
    return sum(store.put(k, k * 1000) for k in keys)


def test_processes_racing_on_one_block_leave_one_good_file(tmp_path: Path) -> None:
    keys = [bytes([i]) * 32 for i in range(40)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as mgr:
        start = mgr.Barrier(4)
        with ctx.Pool(4) as pool:
            wrote = pool.starmap(_put_many, [(str(tmp_path), "ns", keys, start)] * 4)
    assert 40 <= sum(wrote) <= 160
    store = BlockStore(tmp_path, "ns")
    assert sorted(store.keys()) == sorted(keys)
    assert all(store.get(k) == k * 1000 for k in keys)
    assert store.stats.corrupt == 0 and not list(tmp_path.rglob(".tmp-*"))


async def test_storage_blocks_count_for_every_pod_of_the_pool(nats_server, procs,
                                                             tmp_path: Path) -> None:
    """Through agents and the indexer: A's stored prefix is credited to B (cold) as
    SHARED_STORAGE, still after A is gone, and B then serves it from disk."""
    storage = tmp_path / "kv"
    url = nats_server.url
    port = free_port()
    idx = procs.service("indexer", "--nats-url", url, "--http-port", str(port),
                        "--pod-timeout-s", "3", name="indexer")
    sim_a, info_a = procs.sim("--time-scale", "0", "--storage-dir", str(storage))
    _, info_b = procs.sim("--time-scale", "0", "--storage-dir", str(storage))
    a, b = info_a["engines"][0], info_b["engines"][0]
    agent_a = procs.agent(url, a, "sim-a")
    procs.agent(url, b, "sim-b")
    model = info_a["model"]
    rng = random.Random(11)
    prompt = random_prompt(rng, 12 * BS + 3)
    keys = kvblock.prompt_keys(model, prompt, BS)
    nc = await connect(url, "test")

    async def matches() -> dict[str, tuple[int, list[str]]]:
        reply = await request(nc, "im.index.lookup",
                              LookupRequest(model=model, block_keys=keys,
                                            pods=["sim-a", "sim-b"]), LookupReply, timeout=5)
        return {m.pod: (m.blocks, m.tiers) for m in reply.matches}

    async def b_credited() -> bool:
        got = (await matches()).get("sim-b", (0, []))
        return got[0] == 12 and set(got[1]) == {"SHARED_STORAGE"}

    try:
        async with aiohttp.ClientSession() as http:
            await wait_healthy(http, idx, port, "indexer")
            await complete_ids(http, a["http"], prompt, model=model)
            await wait_until(b_credited, what="B credited with A's stored blocks")
            assert (await matches())["sim-a"][0] == 12  # A: its own GPU blocks
            # A goes away (engine and agent): the pool's storage outlives it
            agent_a.stop()
            sim_a.stop()
            await wait_until(lambda: _gone(nc, model, keys, "sim-a"),
                             what="sim-a dropped from the index")
            assert await b_credited()
            got = await complete_ids(http, b["http"], prompt, model=model)
            assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == 12 * BS
    finally:
        await nc.close()


async def _gone(nc: Any, model: str, keys: list[int], pod: str) -> bool:
    reply = await request(nc, "im.index.lookup", LookupRequest(model=model, block_keys=keys),
                          LookupReply, timeout=5)
    return all(m.pod != pod for m in reply.matches)
