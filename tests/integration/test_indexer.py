"""The indexer as a process between real simulator engines, their agents and a real nats-server.

The key check: after random prefix-sharing traffic (with LoRA), evictions, CPU offloads and
cache resets across 8 engines, every lookup equals a brute force over the engines' actual cache
contents (their block hashes, recomputed from the probe's tokens with vLLM's own hashing). The
same holds for a replica started late (it catches up by snapshots), after an agent is killed
(its pod is dropped) and restarted (re-indexed). Garbage on the subjects is counted and dropped.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import msgspec

from infermesh.libs import kvblock
from infermesh.libs.bus import connect, request
from infermesh.libs.process.ports import free_port
from infermesh.proto import codec
from infermesh.proto.messages import (
    BlockStored,
    KVEventBatch,
    LookupReply,
    LookupRequest,
    PodState,
    Snapshot,
    SnapshotBlock,
    SnapshotRequest,
)
from infermesh.services.sim.block_hash import BlockHasher, to_wire

from .helpers import (
    SIM_BLOCK_SIZE,
    complete_ids,
    random_prompt,
    sim_cache,
    wait_healthy,
    wait_until,
)

BS = SIM_BLOCK_SIZE
MODEL = "infermesh/tiny-llama"
LORA = "ad1"
HASHER = BlockHasher("sha256", "0")

Probe = tuple[list[int], str | None]  # token ids, LoRA adapter
Answer = dict[str, tuple[int, list[str]]]


async def start_indexer(procs: Any, nats_url: str, name: str, *extra: str) -> tuple[Any, int]:
    port = free_port()
    p = procs.service("indexer", "--nats-url", nats_url, "--http-port", str(port), *extra,
                      name=name)
    async with aiohttp.ClientSession() as http:
        await wait_healthy(http, p, port, name)
    return p, port


async def metrics(http: aiohttp.ClientSession, port: int) -> dict[str, float]:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def lookup(nc: Any, probe: Probe, pods: list[str] | None = None) -> Answer:
    ids, lora = probe
    keys = kvblock.prompt_keys(MODEL, ids, BS, lora_name=lora)
    reply = await request(nc, "im.index.lookup",
                          LookupRequest(model=MODEL, block_keys=keys, pods=pods), LookupReply,
                          timeout=5)
    return {m.pod: (m.blocks, m.tiers) for m in reply.matches}


def brute_force(caches: dict[str, dict[str, Any]], probe: Probe) -> Answer:
    """Each engine's longest run of cached blocks of the probe, by the engines' own hashes."""
    ids, lora = probe
    hashes = [to_wire(h) for h in HASHER.hash_prompt(
        ids, BS, lora_name=lora, lora_path=f"/loras/{lora}" if lora else None)]
    out: Answer = {}
    for pod, cache in caches.items():
        gpu, cpu = set(cache["GPU"]), set(cache["CPU"])
        tiers = []
        for h in hashes:
            if h in gpu:
                tiers.append("GPU")
            elif h in cpu:
                tiers.append("CPU")
            else:
                break
        if tiers:
            # The indexer leaves out per-block tiers when every matched block is on GPU.
            out[pod] = (len(tiers), [] if set(tiers) == {"GPU"} else tiers)
    return out


async def read_caches(http: aiohttp.ClientSession, engines: dict[str, str]) -> dict[str, Any]:
    return {pod: await sim_cache(http, url) for pod, url in engines.items()}


async def converged(nc: Any, caches: dict[str, Any], probes: list[Probe],
                    rounds: int = 1) -> bool:
    """Whether ``rounds`` lookups of every probe equal the brute force (first mismatch: False)."""
    for _ in range(rounds):
        for probe in probes:
            if await lookup(nc, probe) != brute_force(caches, probe):
                return False
    return True


async def traffic(http: aiohttp.ClientSession, url: str, rng: random.Random,
                  prefixes: list[list[int]], n: int, probes: list[Probe]) -> None:
    """n requests to one engine: shared prefixes, random tails, some LoRA, some cache resets."""
    for _ in range(n):
        if rng.random() < 0.06:
            async with http.post(f"{url}/reset_prefix_cache") as r:
                assert r.status == 200
            continue
        lora = LORA if rng.random() < 0.2 else None
        ids = rng.choice(prefixes) + random_prompt(rng, rng.randrange(0, 6 * BS))
        await complete_ids(http, url, ids, max_tokens=rng.randrange(1, 24),
                           model=lora or MODEL)
        probes.append((ids, lora))


async def test_index_equals_brute_force_through_replicas_agent_loss_and_restart(
    nats_server, procs
):
    url = nats_server.url
    idx1, port1 = await start_indexer(procs, url, "indexer-1")
    _, info = procs.sim("--time-scale", "0", "--hash-seed", "0", "--num-gpu-blocks", "40",
                        "--num-cpu-blocks", "16", "--loras", LORA, engines=8)
    engines = {f"sim-{e['index']}": e for e in info["engines"]}
    urls = {pod: e["http"] for pod, e in engines.items()}
    agents = {pod: procs.agent(url, e, pod) for pod, e in engines.items()}
    nc = await connect(url, "test")
    rng = random.Random(11)
    prefixes = [random_prompt(rng, rng.randrange(1, 5) * BS) for _ in range(6)]
    probes: list[Probe] = [(random_prompt(rng, 4 * BS), None)]  # held by nobody
    async with aiohttp.ClientSession() as http:
        await wait_until(lambda: _gauge(http, port1, "infermesh_indexer_pods", 8),
                         what="indexer sees 8 pods")
        # Two clients per engine, so requests overlap (and some resets are refused).
        await asyncio.gather(*(traffic(http, u, random.Random(i), prefixes, 30, probes)
                               for i, u in enumerate(2 * list(urls.values()))))
        caches = await read_caches(http, urls)
        assert sum(len(c["GPU"]) for c in caches.values()) > 100
        assert any(c["CPU"] for c in caches.values())
        await wait_until(lambda: converged(nc, caches, probes), timeout=20,
                         what="indexer == brute force")
        m1 = await metrics(http, port1)
        # The traffic did evict, offload and reset; nothing was lost or unkeyable on the way.
        assert m1['infermesh_indexer_events_total{type="BlockRemoved"}'] > 50
        assert m1['infermesh_indexer_events_total{type="AllBlocksCleared"}'] > 8
        assert m1["infermesh_indexer_unkeyable_blocks_total"] == 0
        assert m1['infermesh_indexer_bad_messages_total{stream="kv"}'] == 0
        matched = [brute_force(caches, p) for p in probes]
        assert sum(1 for a in matched if a) > 100
        assert sum(1 for a in matched if any(n > 1 for n, _ in a.values())) > 20
        assert any("CPU" in t for a in matched for _, t in a.values())
        # Asked about given pods: exactly those, zeros included.
        probe = next(p for p, a in zip(probes, matched, strict=True) if a)
        got = await lookup(nc, probe, pods=list(engines))
        assert set(got) == set(engines)
        assert {p: v for p, v in got.items() if v[0]} == brute_force(caches, probe)

        # A second replica started now catches up from snapshots; both answer the same.
        idx2, port2 = await start_indexer(procs, url, "indexer-2", "--pod-timeout-s", "1.5")
        await wait_until(lambda: _gauge(http, port2, "infermesh_indexer_snapshots_applied_total",
                                        8, at_least=True), what="late replica's snapshots")
        await wait_until(lambda: converged(nc, caches, probes, rounds=2), timeout=20,
                         what="both replicas == brute force")
        for port in (port1, port2):
            assert (await metrics(http, port))["infermesh_indexer_lookups_total"] > 0
        idx1.stop()
        assert await converged(nc, caches, probes), "the late replica alone"

        # Kill an agent: its pod is dropped after the heartbeat timeout (1.5 s here).
        agents["sim-3"].kill()
        t0 = asyncio.get_running_loop().time()
        await wait_until(lambda: _gauge(http, port2, "infermesh_indexer_pods", 7),
                         what="pod dropped")
        assert asyncio.get_running_loop().time() - t0 < 3
        await wait_until(lambda: converged(nc, {p: c for p, c in caches.items()
                                                if p != "sim-3"}, probes),
                         what="answers without sim-3")
        # A new agent for it: the pod is indexed again (seq 1 of a new epoch, from the
        # engine's replay buffer).
        agents["sim-3"] = procs.agent(url, engines["sim-3"], "sim-3")
        await wait_until(lambda: converged(nc, caches, probes), timeout=20,
                         what="sim-3 re-indexed")

        # Live traffic after all that still converges.
        await asyncio.gather(*(traffic(http, u, random.Random(100 + i), prefixes, 10, probes)
                               for i, u in enumerate(urls.values())))
        caches = await read_caches(http, urls)
        await wait_until(lambda: converged(nc, caches, probes), timeout=20,
                         what="converged after more traffic")
        m2 = await metrics(http, port2)
        assert m2["infermesh_indexer_pods_dropped_total"] >= 1
        assert m2["infermesh_indexer_unkeyable_blocks_total"] == 0
        assert idx2.alive()
    await nc.close()


async def _gauge(http: aiohttp.ClientSession, port: int, name: str, value: float,
                 at_least: bool = False) -> bool:
    v = (await metrics(http, port)).get(name, -1)
    return v >= value if at_least else v == value


async def test_garbage_is_counted_and_lookups_keep_working(nats_server, procs):
    url = nats_server.url
    idx, port = await start_indexer(procs, url, "indexer", "--pod-timeout-s", "30")
    nc = await connect(url, "test")
    toks = list(range(100, 100 + 3 * BS))
    good = KVEventBatch(pod="pod-g", pool="default", epoch="e", seq=1, ts=0.0, model=MODEL,
                        events=[BlockStored(block_hashes=[1, 2, 3], token_ids=toks,
                                            block_size=BS)])
    kv_junk = [
        b"", b"\xc1\xc1 not msgpack", msgspec.msgpack.encode({"pod": 5}),
        msgspec.msgpack.encode([1, 2, 3]),
        codec.encode(msgspec.structs.replace(good, pod="someone-else")),  # not its subject
        codec.encode(msgspec.structs.replace(good, events=[{"type": "Nope"}])),  # type: ignore[list-item]
    ]
    for junk in kv_junk:
        await nc.publish("im.kv.default.pod-g", junk)
    pod_junk = [b"\x00", msgspec.msgpack.encode({"pod": "pod-g"}),
                codec.encode(PodState(pod="x", pool="default", model=MODEL, url="", ts=0,
                                      epoch="e", kv_seq=0))]
    for junk in pod_junk:
        await nc.publish("im.pod.default.pod-g", junk)
    await nc.publish("im.kv.default.pod-g", codec.encode(good))
    keys = kvblock.prompt_keys(MODEL, toks, BS)
    async with aiohttp.ClientSession() as http:
        await wait_until(lambda: _gauge(http, port, 'infermesh_indexer_bad_messages_total'
                                        '{stream="pod"}', len(pod_junk)), what="pod junk counted")
        m = await metrics(http, port)
        assert m['infermesh_indexer_bad_messages_total{stream="kv"}'] == len(kv_junk)
        reply = await request(nc, "im.index.lookup", LookupRequest(model=MODEL, block_keys=keys),
                              LookupReply, timeout=5)
        assert [(x.pod, x.blocks) for x in reply.matches] == [("pod-g", 3)]
        # A malformed lookup gets a 400 and the service keeps answering.
        for junk in (b"\xc1", msgspec.msgpack.encode({"model": 1})):
            resp = await nc.request("im.index.lookup", junk, timeout=5)
            assert resp.headers and resp.headers.get("Nats-Service-Error-Code") == "400"
        odd = await request(nc, "im.index.lookup",
                            LookupRequest(model=MODEL, block_keys=[-1, 2**64 - 1], pods=["x"]),
                            LookupReply, timeout=5)
        assert [(x.pod, x.blocks) for x in odd.matches] == [("x", 0)]
        reply = await request(nc, "im.index.lookup", LookupRequest(model=MODEL, block_keys=keys),
                              LookupReply, timeout=5)
        assert reply.matches[0].blocks == 3
    assert idx.alive()
    await nc.close()


async def test_snapshots_one_at_a_time_with_backoff(nats_server, procs):
    """An agent that does not answer gets one request at a time, further and further apart;
    its answer is applied, batches buffered meanwhile follow, and the requests stop."""
    url = nats_server.url
    _, port = await start_indexer(procs, url, "indexer", "--pod-timeout-s", "30",
                                  "--snapshot-timeout-s", "0.2", "--snapshot-backoff-s", "0.05",
                                  "--kv-seq-grace-s", "0")
    nc = await connect(url, "test")
    toks = list(range(500, 500 + 4 * BS))
    blocks = [SnapshotBlock(10 + i, 10 + i - 1 if i else None, toks[i * BS : (i + 1) * BS],
                            ["GPU"]) for i in range(3)]
    asked: list[float] = []
    loop = asyncio.get_running_loop()

    async def on_request(msg: Any) -> None:
        asked.append(loop.time())
        req = codec.decode(msg.data, SnapshotRequest)
        assert req.pod == "ghost"
        if len(asked) < 4:
            return  # silent: the indexer's request times out
        for part in range(2):
            await nc.publish(msg.reply, codec.encode(Snapshot(
                pod="ghost", pool="default", epoch="e", seq=5, block_size=BS, part=part,
                parts=2, blocks=blocks[part * 2 : part * 2 + 2], model=MODEL)))

    await nc.subscribe("im.snapshot.ghost", cb=on_request)
    # The heartbeat says 5 batches were published: the indexer has none, so it asks.
    beat = PodState(pod="ghost", pool="default", model=MODEL, url="", ts=0, epoch="e", kv_seq=5)
    await nc.publish("im.pod.default.ghost", codec.encode(beat))
    await nc.publish("im.pod.default.ghost", codec.encode(beat))
    await wait_until(lambda: len(asked) >= 1, what="first snapshot request")
    # Batch 6 arrives while the snapshot is pending: it waits, then follows the snapshot.
    b6 = KVEventBatch(pod="ghost", pool="default", epoch="e", seq=6, ts=0.0, model=MODEL,
                      events=[BlockStored(block_hashes=[13], parent_hash=12,
                                          token_ids=toks[3 * BS :], block_size=BS)])
    await nc.publish("im.kv.default.ghost", codec.encode(b6))
    keys = kvblock.prompt_keys(MODEL, toks, BS)

    async def indexed() -> bool:
        r = await request(nc, "im.index.lookup", LookupRequest(model=MODEL, block_keys=keys),
                          LookupReply, timeout=5)
        return [(m.pod, m.blocks) for m in r.matches] == [("ghost", 4)]

    await wait_until(indexed, timeout=10, what="snapshot and buffered batch applied")
    gaps = [b - a for a, b in zip(asked, asked[1:], strict=False)]
    assert len(asked) == 4, asked
    # Each retry waits for the previous request's timeout (0.2 s) plus a doubling backoff.
    assert all(g >= 0.2 for g in gaps) and gaps[2] > gaps[0] + 0.1, gaps
    for _ in range(3):  # heartbeats that agree with what was applied ask for nothing
        await nc.publish("im.pod.default.ghost",
                         codec.encode(msgspec.structs.replace(beat, kv_seq=6)))
    async with aiohttp.ClientSession() as http:
        m = await metrics(http, port)
    assert m["infermesh_indexer_snapshots_failed_total"] == 3
    assert m["infermesh_indexer_snapshots_applied_total"] == 1
    assert len(asked) == 4
    await nc.close()
