"""An engine dies mid-stream under load and comes back (issue 6, point 4).

Two engines, each its own simulator process (so one can be killed with SIGKILL), their agents,
and the real tokenizer, indexer, scheduler and ingress. While a background load flows through
the ingress, the engine that serves a long stream is killed:

* the streaming client gets a clean error event and ``[DONE]``, never a hang;
* no other request fails (those that raced the death are retried on the other engine);
* within one heartbeat of the agent's first ``ready=False``, nothing is routed to the dead engine;
* its blocks leave the index (the agent announces AllBlocksCleared once the port refuses);
* restarted on the same ports, it is ready again, re-indexed from its own cache, and routed to.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import aiohttp

from infermesh.libs.bus import connect, request
from infermesh.libs.process.ports import free_port_range
from infermesh.proto import codec
from infermesh.proto.messages import (
    LookupReply,
    LookupRequest,
    PodState,
    RequestEvent,
    TokenizeReply,
    TokenizeRequest,
)

from .helpers import SIM_BLOCK_SIZE, services_ready, wait_until

MODEL = "infermesh/tiny-llama"
BS = SIM_BLOCK_SIZE
HEARTBEAT_S = 0.2


def _text(rng: random.Random, words: int) -> str:
    vocab = ("amber basil cedar dune ember fjord grove harbor iris juniper kelp lagoon meadow "
             "nectar orchid prairie").split()
    return " ".join(rng.choice(vocab) for _ in range(words))


class Engines:
    """Two single-engine simulator processes on fixed ports, so one can come back."""

    def __init__(self, procs: Any) -> None:
        self.procs = procs
        self.ports: dict[str, tuple[int, int]] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.proc: dict[str, Any] = {}

    def start(self, pod: str) -> dict[str, Any]:
        if pod not in self.ports:
            kv = free_port_range(2)  # the PUB socket and, on kv + 1, the replay socket
            http = free_port_range(1)
            while http in (kv, kv + 1):
                http = free_port_range(1)
            self.ports[pod] = (http, kv)
        http, kv = self.ports[pod]
        p, info = self.procs.sim("--time-scale", "1", "--hash-seed", "0", "--http-port", str(http),
                                 "--kv-port", str(kv), "--num-gpu-blocks", "2000")
        self.proc[pod] = p
        self.info[pod] = info["engines"][0]
        return self.info[pod]


async def _lookup(nc: Any, keys: list[int]) -> dict[str, int]:
    r = await request(nc, "im.index.lookup", LookupRequest(model=MODEL, block_keys=keys),
                      LookupReply)
    return {m.pod: m.blocks for m in r.matches}


async def test_engine_dies_mid_stream_is_avoided_dropped_and_reindexed(nats_server, procs):
    engines = Engines(procs)
    for pod in ("sim-a", "sim-b"):
        procs.agent(nats_server.url, engines.start(pod), pod)
    bus = ["--nats-url", nats_server.url, "--http-port", "-1"]
    procs.service("tokenizer", *bus)
    procs.service("indexer", *bus)
    procs.service("scheduler", *bus)
    port = free_port_range(1)
    ingress = procs.service("ingress", "--nats-url", nats_server.url, "--http-port", str(port))
    url = f"http://127.0.0.1:{port}"

    nc = await connect(nats_server.url, "test")
    states: dict[str, list[tuple[float, bool]]] = {"sim-a": [], "sim-b": []}
    routed: list[tuple[float, str]] = []

    async def on_pod(msg: Any) -> None:
        st = codec.decode(msg.data, PodState)
        if st.pod in states:
            states[st.pod].append((time.monotonic(), st.ready))

    async def on_req(msg: Any) -> None:
        ev = codec.decode(msg.data, RequestEvent)
        if ev.kind == "routed":
            routed.append((time.monotonic(), ev.pod))

    await nc.subscribe("im.pod.*.*", cb=on_pod)
    await nc.subscribe("im.req.*", cb=on_req)
    rng = random.Random(6)
    async with aiohttp.ClientSession() as http:

        async def healthy() -> bool:
            try:
                async with http.get(url + "/health") as r:
                    return r.status == 200 and (await r.json()).get("pods") == 2
            except aiohttp.ClientError:
                return False

        await wait_until(healthy, timeout=60, what="ingress sees both engines")
        assert ingress.alive()
        await services_ready(nats_server.url)

        # A long prefix, served once: the index says which engine holds it.
        prefix = _text(rng, 500)
        async with http.post(url + "/v1/completions", json={
                "model": MODEL, "prompt": prefix + " warm", "max_tokens": 2}) as r:
            assert r.status == 200, await r.text()
            victim = r.headers["x-infermesh-endpoint"]
        other = "sim-b" if victim == "sim-a" else "sim-a"
        keys = (await request(nc, "im.tokenize", TokenizeRequest(
            model=MODEL, block_size=BS, prompt=prefix), TokenizeReply)).block_keys

        async def victim_indexed() -> bool:
            return (await _lookup(nc, keys)).get(victim, 0) >= len(keys) - 1

        await wait_until(victim_indexed, what="prefix indexed on the victim")

        # Background load: short requests through the ingress, two at a time.
        results: list[tuple[float, int, str]] = []
        stop_load = asyncio.Event()

        async def load() -> None:
            while not stop_load.is_set():
                body = {"model": MODEL, "prompt": _text(rng, 30), "max_tokens": 3}
                async with http.post(url + "/v1/completions", json=body) as r:
                    await r.read()
                    results.append((time.monotonic(), r.status,
                                    r.headers.get("x-infermesh-endpoint", "")))

        loaders = [asyncio.create_task(load()) for _ in range(2)]

        # The long stream lands on the victim (it holds the prefix); kill it mid-stream.
        stream_body = {"model": MODEL, "prompt": prefix + " tell me more", "max_tokens": 600,
                       "stream": True}
        async with http.post(url + "/v1/completions", json=stream_body) as r:
            assert r.status == 200
            assert r.headers["x-infermesh-endpoint"] == victim
            got = b""
            async for chunk in r.content.iter_any():
                got += chunk
                if got.count(b"data: ") >= 20 and engines.proc[victim].alive():
                    engines.proc[victim].kill()  # SIGKILL, mid-stream
                    t_kill = time.monotonic()
            t_stream_end = time.monotonic()
        assert not engines.proc[victim].alive()
        events = [e for e in got.split(b"\n\n") if e.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]"
        err = json.loads(events[-2][len(b"data: "):])
        assert "failed mid-stream" in err["error"]["message"], err
        assert t_stream_end - t_kill < 5.0

        # The agent says ready=False at its next heartbeat; nothing routes there after that.
        await wait_until(lambda: any(t > t_kill and not ok for t, ok in states[victim]),
                         what="victim's heartbeat says not ready")
        t_not_ready = next(t for t, ok in states[victim] if t > t_kill and not ok)

        # Its blocks leave the index.
        async def victim_gone() -> bool:
            return victim not in await _lookup(nc, keys)

        await wait_until(victim_gone, what="victim's blocks leave the index")
        t_unindexed = time.monotonic()

        # Keep the load on for a while after, then stop it.
        n_at_drop = len(results)
        await wait_until(lambda: len(results) >= n_at_drop + 20, what="load after the death")
        stop_load.set()
        await asyncio.gather(*loaders)
        late = [p for t, p in routed if t > t_not_ready + HEARTBEAT_S and p == victim]
        assert not late, f"{len(late)} requests routed to the dead engine after its heartbeat"
        raced = sum(1 for t, p in routed if t_kill <= t <= t_not_ready + HEARTBEAT_S
                    and p == victim)
        failed = [s for _, s, _ in results if s != 200]
        assert not failed, failed
        assert {p for t, _, p in results if t > t_not_ready + HEARTBEAT_S} == {other}

        # It comes back on the same ports: ready, re-indexed from its own cache, routed to.
        t_restart = time.monotonic()
        engines.start(victim)
        await wait_until(lambda: any(t > t_restart and ok for t, ok in states[victim]),
                         timeout=30, what="victim ready again")
        t_ready = next(t for t, ok in states[victim] if t > t_restart and ok)
        fresh = _text(rng, 300)
        async with http.post(engines.info[victim]["http"] + "/v1/completions", json={
                "model": MODEL, "prompt": fresh, "max_tokens": 2}) as r:
            assert r.status == 200
        fresh_keys = (await request(nc, "im.tokenize", TokenizeRequest(
            model=MODEL, block_size=BS, prompt=fresh), TokenizeReply)).block_keys

        async def reindexed() -> bool:
            return (await _lookup(nc, fresh_keys)).get(victim, 0) >= len(fresh_keys) - 1

        await wait_until(reindexed, what="victim re-indexed")
        t_reindexed = time.monotonic()
        # Cache-aware routing uses it again: the fresh prompt's follow-ups go to it.
        for i in range(3):
            async with http.post(url + "/v1/completions", json={
                    "model": MODEL, "prompt": fresh + f" and then {i}", "max_tokens": 2}) as r:
                assert r.status == 200
                assert r.headers["x-infermesh-endpoint"] == victim
    await nc.close()
    print(f"\nengine failure: load requests sent={len(results)} failed={len(failed)}; "
          f"routed to the dead engine before its heartbeat={raced} (all retried); "
          f"stream ended {1000 * (t_stream_end - t_kill):.0f} ms after the kill; "
          f"not-ready heartbeat {1000 * (t_not_ready - t_kill):.0f} ms; blocks unindexed "
          f"{1000 * (t_unindexed - t_kill):.0f} ms; restart→ready "
          f"{t_ready - t_restart:.2f} s; restart→re-indexed {t_reindexed - t_restart:.2f} s")
