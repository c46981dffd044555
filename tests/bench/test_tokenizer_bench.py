"""Benchmark: tokenize + block keys over the bus, for 1k-, 8k- and 100k-token prompts.

A tokenizer process serves ``im.tokenize`` on a real nats-server; this process sends requests one
at a time and times each round trip (encode, NATS, render/tokenize/keys, reply). Per size:

* ``cold``: every prompt is new (no cache can help);
* ``prefix``: every prompt shares its first 90% with the others and ends in a new tail (a long
  system prompt or document, then a new question): the chunk cache path;
* ``cached``: the same prompt again: the prompt cache path;
* ``baseline``: plain ``ModelTokenizer.encode`` of the cold prompts in this process (no bus, no
  keys), and ``baseline+keys`` with ``kvblock.prompt_keys`` after it.

Prints p50/p99 per size and mode; asserts nothing about time. `make bench` runs it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
from pathlib import Path

import pytest

from infermesh.libs.bus import NatsServer, connect, request
from infermesh.libs.kvblock import prompt_keys
from infermesh.libs.process.process import Process
from infermesh.libs.process.ready import wait_bus_services
from infermesh.libs.tinymodel import DEFAULT_MODEL_NAME
from infermesh.libs.tinymodel.corpus import corpus
from infermesh.libs.tokenization import ModelTokenizer
from infermesh.proto.messages import TokenizeReply, TokenizeRequest

pytestmark = pytest.mark.bench

MODEL = DEFAULT_MODEL_NAME
BS = 16
SIZES = [int(x) for x in os.environ.get("BENCH_TOKENIZER_SIZES", "1000,8000,100000").split(",")]
# Requests per mode for each size (a 100k-token cold prompt takes ~0.1 s, its baseline ~0.2 s).
RUNS = {1000: 200, 8000: 100, 100000: 20}
SCALE = float(os.environ.get("BENCH_TOKENIZER_SCALE", "1"))


def _runs(size: int) -> int:
    return max(5, int(RUNS.get(size, 20) * SCALE))


class TextSource:
    """Distinct slices of a long generated corpus (no two prompts share a chunk)."""

    def __init__(self, chars: int) -> None:
        docs: list[str] = []
        total = 0
        for d in corpus(99, documents=10**7):
            docs.append(d)
            total += len(d) + 2
            if total > chars:
                break
        self.text = "\n\n".join(docs)
        self.pos = 0

    def take(self, chars: int) -> str:
        if self.pos + chars > len(self.text):
            raise RuntimeError("corpus exhausted")
        out = self.text[self.pos : self.pos + chars]
        self.pos += chars
        return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def _wait_service(nc, proc: Process, timeout: float = 120.0) -> None:
    await wait_bus_services(nc, {"infermesh-tokenizer": 1}, timeout, [proc])


async def _bus_times(nc, prompts: list[str]) -> tuple[list[float], list[int]]:
    times, tokens = [], []
    for p in prompts:
        t0 = time.perf_counter()
        r = await request(nc, "im.tokenize", TokenizeRequest(model=MODEL, block_size=BS, prompt=p),
                          TokenizeReply, timeout=60)
        times.append(time.perf_counter() - t0)
        tokens.append(r.num_tokens)
    return times, tokens


async def _bench(url: str, proc: Process, tok: ModelTokenizer) -> list[tuple[int, str, int, float,
                                                                          float, int]]:
    sample = "\n\n".join(itertools.islice(corpus(98), 300))
    chars_per_token = len(sample) / len(tok.encode(sample))
    need = sum(int(s * chars_per_token * 1.02) * (2 * _runs(s) + 6) for s in SIZES)
    source = TextSource(need)
    nc = await connect(url, "bench")
    rows = []
    try:
        await _wait_service(nc, proc)
        for size in SIZES:
            chars = int(size * chars_per_token)
            n = _runs(size)
            cold = [source.take(chars) for _ in range(n + 3)]
            shared = source.take(chars * 9 // 10)
            prefixed = [shared + source.take(chars - len(shared)) for _ in range(n + 3)]
            await _bus_times(nc, cold[:3] + prefixed[:1])  # warm-up (and the shared prefix)
            results = {}
            results["cold"] = await _bus_times(nc, cold[3:])
            results["prefix"] = await _bus_times(nc, prefixed[3:])
            results["cached"] = await _bus_times(nc, [cold[3]] * n)
            # The baseline tokenizer sees the same texts in the same order as the service (HF
            # keeps a per-word cache, so both are equally warm).
            for p in cold[:3] + prefixed[:1]:
                tok.encode(p)
            base, base_keys = [], []
            for p in cold[3:]:
                t0 = time.perf_counter()
                ids = tok.encode(p)
                t1 = time.perf_counter()
                prompt_keys(MODEL, ids, BS)
                t2 = time.perf_counter()
                base.append(t1 - t0)
                base_keys.append(t2 - t0)
            for mode, (times, tokens) in results.items():
                rows.append((size, mode, n, _pct(times, 0.5), _pct(times, 0.99),
                             sum(tokens) // len(tokens)))
            mean_tokens = rows[-3][5]
            rows.append((size, "baseline", n, _pct(base, 0.5), _pct(base, 0.99), mean_tokens))
            rows.append((size, "baseline+keys", n, _pct(base_keys, 0.5), _pct(base_keys, 0.99),
                         mean_tokens))
    finally:
        await nc.close()
    return rows


def test_tokenizer_latency(nats_server: NatsServer, model_dir: Path, tmp_path: Path) -> None:
    tok = ModelTokenizer.from_folder(model_dir)
    proc = Process("tokenizer", [sys.executable, "-m", "infermesh.services.tokenizer", "--nats-url",
                 nats_server.url, "--models", f"{MODEL}={model_dir}", "--http-port", "-1"],
                log=tmp_path / "tokenizer.log").start()
    try:
        rows = asyncio.run(_bench(nats_server.url, proc, tok))
    finally:
        proc.stop()
    print(f"\ntokenize + keys (block size {BS}) over the bus, one request at a time; "
          f"baseline: ModelTokenizer.encode in this process ({os.cpu_count()} CPUs)")
    print(f"{'tokens':>8} {'mode':<14} {'n':>4} {'p50 ms':>9} {'p99 ms':>9} {'mean tokens':>12}")
    for size, mode, n, p50, p99, tokens in rows:
        print(f"{size:>8} {mode:<14} {n:>4} {p50 * 1e3:>9.3f} {p99 * 1e3:>9.3f} {tokens:>12}")
