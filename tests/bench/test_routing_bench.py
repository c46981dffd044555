"""Benchmark: routing overhead at the ingress — request received → first byte sent to the engine —
and the latency each router adds to a request, next to peer routers.

The whole system runs as processes (nats, 4 simulated engines with agents, tokenizer, indexer,
scheduler, ingress). Requests of 1k, 8k and 100k prompt tokens arrive at a fixed rate; each shares
a long prefix with the others of its size (as chat traffic does) and ends in a unique question.
The ingress reports its routing time in the ``x-infermesh-routing-ms`` header. Every size runs
with the default profile (precise prefix + load) and, as the baseline in the same process, with
the ``random`` profile (the same tokenizer and bus hops, no index lookup, no scoring).

Then, on the same engines, the added latency of each path: the same kind of request (90% shared
prefix, warmed on every engine first; an unseen 10% tail; ``max_tokens`` 1) sent straight to one
engine (``direct``; ``BENCH_ROUTING_DIRECT=all`` takes the engines in turn), through our ingress
(default profile), and through ``sglang-router`` and ``vllm-router`` with their ``cache_aware``
policy, each started in front of the stack's 4 engines (services/bench/peers.py; a peer that is
not installed is skipped with its reason). Each size runs closed loops at concurrency 1 and 8;
the paths take turns in rounds (the order rotating) so the machine's noise hits them alike. A
path's added latency is its client-side end-to-end p50 (p90) minus the direct path's p50 (p90) of
the same size and concurrency. ``BENCH_ROUTING_CONCURRENCY``, ``_ROUNDS``, ``_TURN`` and
``_PEERS`` shrink it.

Prints p50/p90/p99 per size and profile, and the added-latency table; asserts nothing about time
(only that every request succeeded). `make bench` runs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aiohttp
import pytest

from infermesh.libs.bus import NatsServer
from infermesh.libs.process.process import Process
from infermesh.libs.tinymodel import ensure_model_folder
from infermesh.libs.tokenization import ModelTokenizer
from infermesh.services.bench import peers as P

from ..conftest import ProcessManager
from ..stack import Stack, log_dir, start_stack

pytestmark = pytest.mark.bench

MODEL = "infermesh/tiny-llama"
SIZES = [int(x) for x in os.environ.get("BENCH_ROUTING_SIZES", "1000,8000,100000").split(",")]
REQUESTS = int(os.environ.get("BENCH_ROUTING_REQUESTS", "40"))
RATE = float(os.environ.get("BENCH_ROUTING_RATE", "5"))  # requests per second
# Added latency: closed-loop concurrencies, rounds (each path takes one turn per round), and the
# requests each path sends per turn at concurrency c: max(TURN, 2c).
CONCURRENCY = [int(x) for x in os.environ.get("BENCH_ROUTING_CONCURRENCY", "1,8").split(",")]
ROUNDS = int(os.environ.get("BENCH_ROUTING_ROUNDS", "4"))
TURN = int(os.environ.get("BENCH_ROUTING_TURN", "6"))
# The peer routers to put in front of the engines ("" for none), each with cache_aware.
PEERS = [x for x in os.environ.get("BENCH_ROUTING_PEERS", "sglang-router,vllm-router").split(",")
         if x]
PEER_POLICY = "cache_aware"
# The direct path's engine: an index into the stack's engines, or "all" (round-robin over them,
# a router that costs nothing; at concurrency > 1 one engine alone queues what a router spreads).
DIRECT = os.environ.get("BENCH_ROUTING_DIRECT", "0")
ROUTING_HEADER = "x-infermesh-routing-ms"


def _text(tok: ModelTokenizer, rng: random.Random, tokens: int) -> str:
    words = ("alpha beta gamma delta river stone cloud light north quiet engine market window "
             "garden silver paper").split()
    text = " ".join(rng.choice(words) for _ in range(tokens))
    ids = tok.encode(text, add_special_tokens=False)[:tokens]
    return tok.decode(ids)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@dataclass
class _System:
    stack: Stack
    tok: ModelTokenizer


@pytest.fixture(scope="module")
def system() -> Iterator[_System]:
    """The whole system as processes (4 engines, no modelled time), stopped after the module."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    model_dir = ensure_model_folder()
    tok = ModelTokenizer.from_folder(model_dir)
    nats = NatsServer(max_payload=8 * 1024 * 1024).start()
    procs = ProcessManager(tmp, model_dir)
    try:
        yield _System(stack=start_stack(procs, nats, engines=4, time_scale=0.0), tok=tok)
    finally:
        procs.stop_all()
        nats.stop()


async def _run(url: str, prompts: list[str], profile: str | None) -> list[float]:
    out: list[float] = []
    headers = {"x-infermesh-profile": profile} if profile else {}

    async def one(http: aiohttp.ClientSession, prompt: str) -> None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
        async with http.post(url + "/v1/completions", json=body, headers=headers) as r:
            await r.read()
            assert r.status == 200
            out.append(float(r.headers[ROUTING_HEADER]))

    async with aiohttp.ClientSession() as http:
        tasks = []
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            delay = t0 + i / RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(http, p)))
        await asyncio.gather(*tasks)
    return out


def test_routing_overhead(system: _System) -> None:
    stack, tok = system.stack, system.tok
    rows = []
    rng = random.Random(0)
    for size in SIZES:
        prefix = _text(tok, rng, int(size * 0.9))
        for profile in (None, "random"):
            prompts = [prefix + " " + _text(tok, rng, size // 10) + f" q{i}"
                       for i in range(REQUESTS)]
            # One warm-up request so the shared prefix is cached and indexed.
            asyncio.run(_run(stack.ingress_url, prompts[:1], profile))
            ms = asyncio.run(_run(stack.ingress_url, prompts[1:], profile))
            rows.append((size, profile or "default", ms))
    print(f"\nrouting overhead at the ingress (ms), {REQUESTS - 1} requests per row at "
          f"{RATE:g}/s, 4 engines, 2-core machine")
    print(f"  {'prompt tokens':>13}  {'profile':<8} {'p50':>8} {'p90':>8} {'p99':>8} {'mean':>8}")
    for size, profile, ms in rows:
        print(f"  {size:>13,}  {profile:<8} {_pct(ms, .5):8.2f} {_pct(ms, .9):8.2f} "
              f"{_pct(ms, .99):8.2f} {statistics.mean(ms):8.2f}")


# ------------------------------------------------------------------ added latency per path


@dataclass
class _Engines:
    """The stack's engines as a :class:`peers.PeerRouter` fleet: where they listen, and their
    processes (watched while the router gets ready)."""

    host: str
    urls: list[str]
    sims: list[Process]

    def procs(self) -> list[Process]:
        return self.sims


@dataclass
class _Path:
    name: str
    urls: list[str]  # OpenAI base URLs (no /v1), taken in turn
    e2e_ms: list[float] = field(default_factory=list)
    routing_ms: list[float] = field(default_factory=list)  # the ingress's header, when sent
    sent: int = 0

    def next_url(self) -> str:
        self.sent += 1
        return self.urls[(self.sent - 1) % len(self.urls)]


def _body(prompt: str) -> bytes:
    return json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 1}).encode()


async def _post(http: aiohttp.ClientSession, path: _Path, body: bytes,
                record: bool = True) -> None:
    t0 = time.perf_counter()
    async with http.post(path.next_url() + "/v1/completions", data=body,
                         headers={"content-type": "application/json"}) as r:
        text = await r.read()
        e2e = (time.perf_counter() - t0) * 1000.0
        assert r.status == 200, f"{path.name}: HTTP {r.status}: {text[:300]!r}"
        if record:
            path.e2e_ms.append(e2e)
            if ROUTING_HEADER in r.headers:
                path.routing_ms.append(float(r.headers[ROUTING_HEADER]))


async def _closed_loop(http: aiohttp.ClientSession, path: _Path, bodies: list[bytes],
                       concurrency: int, record: bool = True) -> None:
    """``concurrency`` clients, each sending its next request when its last one completed."""
    queue = list(reversed(bodies))

    async def client() -> None:
        while queue:
            await _post(http, path, queue.pop(), record)

    await asyncio.gather(*(client() for _ in range(concurrency)))


async def _measure(paths: list[_Path], engine_urls: list[str], prompts: list[str],
                   concurrency: int) -> None:
    """Warm the prefix (every engine directly, then once through every path), then ROUNDS
    rounds in which each path, in rotating order, runs one closed-loop turn."""
    turn = max(TURN, 2 * concurrency)
    feed = iter(prompts)
    conn = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
        for url in engine_urls:
            await _post(http, _Path("warm-up", [url]), _body(next(feed)), record=False)
        for path in paths:
            # Once alone (the router learns the prefix), then at the turns' concurrency (this
            # opens the connections they reuse).
            await _post(http, path, _body(next(feed)), record=False)
            await _closed_loop(http, path, [_body(next(feed)) for _ in range(concurrency)],
                               concurrency, record=False)
        for r in range(ROUNDS):
            for k in range(len(paths)):
                path = paths[(r + k) % len(paths)]
                bodies = [_body(next(feed)) for _ in range(turn)]
                await _closed_loop(http, path, bodies, concurrency)


def _peer_routers(stack: Stack) -> tuple[list[tuple[P.PeerPlan, P.PeerRouter]], list[str]]:
    """Each requested peer's router (not started), and why any peer is skipped."""
    engines = _Engines(host=stack.system.plan.spec.host,
                       urls=[e["http"] for e in stack.engines],
                       sims=stack.system.procs("sim"))
    routers: list[tuple[P.PeerPlan, P.PeerRouter]] = []
    skipped: list[str] = []
    for name in PEERS:
        try:
            (plan,) = P.resolve([name], [PEER_POLICY], len(stack.engines))
        except P.PeerError as e:
            skipped.append(f"{name}: {e}")
            continue
        if PEER_POLICY not in plan.policies:
            skipped.append(f"{name}: {plan.skipped.get(PEER_POLICY, 'not run')}")
            continue
        router = P.PeerRouter(plan.peer, plan.executable, PEER_POLICY,
                              cast(P.SimFleet, engines), model=MODEL, log_dir=log_dir(stack))
        routers.append((plan, router))
    return routers, skipped


def test_added_latency(system: _System) -> None:
    stack, tok = system.stack, system.tok
    engine_urls = [e["http"] for e in stack.engines]
    routers, skipped = _peer_routers(stack)
    results: list[tuple[int, int, list[_Path]]] = []
    t_start = time.monotonic()
    try:
        for _, router in routers:
            router.start()
        rng = random.Random(1)
        for size in SIZES:
            prefix = _text(tok, rng, int(size * 0.9))
            for concurrency in CONCURRENCY:
                paths = [_Path(f"direct (engine {DIRECT})",
                               engine_urls if DIRECT == "all" else [engine_urls[int(DIRECT)]]),
                         _Path("infermesh ingress", [stack.ingress_url])]
                paths += [_Path(f"{plan.peer.name} {plan.version or ''} {PEER_POLICY}"
                                .replace("  ", " "), [router.url]) for plan, router in routers]
                turn = max(TURN, 2 * concurrency)
                n = len(engine_urls) + len(paths) * (1 + concurrency + ROUNDS * turn)
                # The warm-up request on each engine carries the prefix; every other request
                # shares it and ends in a tail of its own.
                prompts = [prefix + " " + _text(tok, rng, size // 10) + f" q{i}"
                           for i in range(n)]
                asyncio.run(_measure(paths, engine_urls, prompts, concurrency))
                results.append((size, concurrency, paths))
    finally:
        for _, router in routers:
            router.stop()
    wall = time.monotonic() - t_start

    print(f"\nadded latency per path (ms): client-side end-to-end, max_tokens 1, 90% shared "
          f"prefix warmed on every engine, unseen 10% tail; {ROUNDS} interleaved rounds of "
          f"max({TURN}, 2c) requests per path, 4 engines, 2-core machine ({wall:.0f} s)")
    for why in skipped:
        print(f"  skipped {why}")
    print(f"  {'tokens':>7} {'c':>2}  {'path':<32} {'n':>4} {'e2e p50':>8} {'p90':>8} "
          f"{'added p50':>9} {'p90':>8} {'routing p50':>11} {'p90':>6}")
    for size, concurrency, paths in results:
        base50, base90 = _pct(paths[0].e2e_ms, .5), _pct(paths[0].e2e_ms, .9)
        for path in paths:
            p50, p90 = _pct(path.e2e_ms, .5), _pct(path.e2e_ms, .9)
            added = ("" if path is paths[0] else f"{p50 - base50:9.2f} {p90 - base90:8.2f}")
            routing = (f"{_pct(path.routing_ms, .5):11.2f} {_pct(path.routing_ms, .9):6.2f}"
                       if path.routing_ms else "")
            print(f"  {size:>7,} {concurrency:>2}  {path.name:<32} {len(path.e2e_ms):>4} "
                  f"{p50:8.2f} {p90:8.2f} {added or ' ' * 18:>18} {routing}".rstrip())
        # Every request succeeded (_post asserts each status) and every turn completed.
        assert all(len(p.e2e_ms) == ROUNDS * max(TURN, 2 * concurrency) for p in paths)
