"""Benchmark: routing overhead at the ingress — request received → first byte sent to the engine.

The whole system runs as processes (nats, 4 simulated engines with agents, tokenizer, indexer,
scheduler, ingress). Requests of 1k, 8k and 100k prompt tokens arrive at a fixed rate; each shares
a long prefix with the others of its size (as chat traffic does) and ends in a unique question.
The ingress reports its routing time in the ``x-infermesh-routing-ms`` header. Every size runs
with the default profile (precise prefix + load) and, as the baseline in the same process, with
the ``random`` profile (the same tokenizer and bus hops, no index lookup, no scoring).

Prints p50/p90/p99 per size and profile; asserts nothing about time. `make bench` runs it.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest

from infermesh.libs.bus import NatsServer
from infermesh.libs.tinymodel import ensure_model_folder
from infermesh.libs.tokenization import ModelTokenizer

from ..conftest import ProcessManager
from ..stack import start_stack

pytestmark = pytest.mark.bench

MODEL = "infermesh/tiny-llama"
SIZES = [int(x) for x in os.environ.get("BENCH_ROUTING_SIZES", "1000,8000,100000").split(",")]
REQUESTS = int(os.environ.get("BENCH_ROUTING_REQUESTS", "40"))
RATE = float(os.environ.get("BENCH_ROUTING_RATE", "5"))  # requests per second


def _text(tok: ModelTokenizer, rng: random.Random, tokens: int) -> str:
    words = ("alpha beta gamma delta river stone cloud light north quiet engine market window "
             "garden silver paper").split()
    text = " ".join(rng.choice(words) for _ in range(tokens))
    ids = tok.encode(text, add_special_tokens=False)[:tokens]
    return tok.decode(ids)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _run(url: str, prompts: list[str], profile: str | None) -> list[float]:
    out: list[float] = []
    headers = {"x-infermesh-profile": profile} if profile else {}

    async def one(http: aiohttp.ClientSession, prompt: str) -> None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
        async with http.post(url + "/v1/completions", json=body, headers=headers) as r:
            await r.read()
            assert r.status == 200
            out.append(float(r.headers["x-infermesh-routing-ms"]))

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


def test_routing_overhead() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    model_dir = ensure_model_folder()
    tok = ModelTokenizer.from_folder(model_dir)
    nats = NatsServer(max_payload=8 * 1024 * 1024).start()
    procs = ProcessManager(tmp, model_dir)
    rows = []
    try:
        stack = start_stack(procs, nats, engines=4, time_scale=0.0)
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
    finally:
        procs.stop_all()
        nats.stop()
    print(f"\nrouting overhead at the ingress (ms), {REQUESTS - 1} requests per row at "
          f"{RATE:g}/s, 4 engines, 2-core machine")
    print(f"  {'prompt tokens':>13}  {'profile':<8} {'p50':>8} {'p90':>8} {'p99':>8} {'mean':>8}")
    for size, profile, ms in rows:
        print(f"  {size:>13,}  {profile:<8} {_pct(ms, .5):8.2f} {_pct(ms, .9):8.2f} "
              f"{_pct(ms, .99):8.2f} {statistics.mean(ms):8.2f}")
