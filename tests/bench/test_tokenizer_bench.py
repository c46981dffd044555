"""Benchmark: tokenize + block keys over the bus, for 1k-, 8k- and 100k-token prompts.

A tokenizer process serves ``im.tokenize`` on a real nats-server; this process sends requests one
at a time and times each round trip (encode, NATS, render/tokenize/keys, reply). Per size:

* ``cold``: every prompt is new (no cache can help);
* ``prefix``: every prompt shares its first 90% with the others and ends in a new tail (a long
  system prompt or document, then a new question): the chunk cache path;
* ``cached``: the same prompt again: the prompt cache path;
* ``baseline``: plain ``ModelTokenizer.encode`` of the cold prompts in this process (no bus, no
  keys), and ``baseline+keys`` with ``kvblock.prompt_keys`` after it.

Each bus mode runs against a tokenizer with early replies off (``--early-reply-chars 0``: the
whole prompt is tokenized before the reply) and, in the same run, one with the default (a long
never-seen tail is answered with the known prefix's keys and tokenized in the background). The
requests are spaced (``BENCH_TOKENIZER_GAP_S`` per 100k tokens, scaled by size) so that the
background work of one request is done before the next, as at a moderate request rate;
``prefix-b2b`` sends them back to back (the background is full: some are tokenized before their
reply). ``prefix handler`` times ``TokenizerService.tokenize`` in this process: the tokenizer's own
part, without the bus.

Prints p50/p90/p99 per size, mode and setting; asserts nothing about time. `make bench` runs it.
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
from infermesh.services.tokenizer.config import TokenizerConfig
from infermesh.services.tokenizer.service import TokenizerService

pytestmark = pytest.mark.bench

MODEL = DEFAULT_MODEL_NAME
BS = 16
SIZES = [int(x) for x in os.environ.get("BENCH_TOKENIZER_SIZES", "1000,8000,100000").split(",")]
# Requests per mode for each size (a 100k-token cold prompt takes ~0.1 s, its baseline ~0.2 s).
RUNS = {1000: 200, 8000: 100, 100000: 20}
SCALE = float(os.environ.get("BENCH_TOKENIZER_SCALE", "1"))
# Pause between requests per 100k tokens: longer than a 100k-token prompt's background work.
GAP_S = float(os.environ.get("BENCH_TOKENIZER_GAP_S", "0.3"))

Row = tuple[int, str, str, int, float, float, float, int, int]


def _runs(size: int) -> int:
    return max(5, int(RUNS.get(size, 20) * SCALE))


def _gap(size: int) -> float:
    return GAP_S * size / 100000


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

    def prefixed(self, chars: int, n: int) -> list[str]:
        """``n`` texts of ``chars`` characters sharing their first 90%."""
        shared = self.take(chars * 9 // 10)
        return [shared + self.take(chars - len(shared)) for _ in range(n)]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _row(size: int, mode: str, early: str, times: list[float], tokens: list[int],
         partial: int) -> Row:
    return (size, mode, early, len(times), _pct(times, 0.5), _pct(times, 0.9), _pct(times, 0.99),
            sum(tokens) // len(tokens), partial)


async def _bus_times(nc, prompts: list[str], gap: float = 0.0) -> tuple[list[float], list[int],
                                                                         int]:
    times, tokens, partial = [], [], 0
    for p in prompts:
        t0 = time.perf_counter()
        r = await request(nc, "im.tokenize", TokenizeRequest(model=MODEL, block_size=BS, prompt=p),
                          TokenizeReply, timeout=60)
        times.append(time.perf_counter() - t0)
        tokens.append(r.num_tokens)
        partial += r.partial
        if gap:
            await asyncio.sleep(gap)
    return times, tokens, partial


async def _bus_bench(url: str, proc: Process, source: TextSource, chars_per_token: float,
                     early: str) -> list[Row]:
    nc = await connect(url, "bench")
    rows = []
    try:
        await wait_bus_services(nc, {"infermesh-tokenizer": 1}, 120.0, [proc])
        for size in SIZES:
            chars = int(size * chars_per_token)
            n, gap = _runs(size), _gap(size)
            cold = [source.take(chars) for _ in range(n + 3)]
            prefixed = source.prefixed(chars, n + 1)
            await _bus_times(nc, cold[:3] + prefixed[:1], gap)  # warm-up (and the shared prefix)
            await asyncio.sleep(gap * 3)  # the shared prefix's background work done, if any
            results = {"cold": await _bus_times(nc, cold[3:], gap),
                       "prefix": await _bus_times(nc, prefixed[1:], gap)}
            if early == "on":
                b2b = source.prefixed(chars, n + 1)
                await _bus_times(nc, b2b[:1], gap * 3)
                results["prefix-b2b"] = await _bus_times(nc, b2b[1:])
                await asyncio.sleep(gap * 3)
            results["cached"] = await _bus_times(nc, [cold[3]] * n)
            rows += [_row(size, mode, early, *r) for mode, r in results.items()]
    finally:
        await nc.close()
    return rows


async def _handler_bench(model_dir: Path, source: TextSource, chars_per_token: float,
                         early: str) -> list[Row]:
    """``prefix`` timed at ``TokenizerService.tokenize``, in this process, without the bus."""
    cfg = TokenizerConfig(models=[f"{MODEL}={model_dir}"], http_port=-1)
    if early == "off":
        cfg.early_reply_chars = 0
    svc = TokenizerService(cfg)
    svc.load_models()
    rows = []
    try:
        for size in SIZES:
            chars, n, gap = int(size * chars_per_token), _runs(size), _gap(size)
            times, tokens, partial = [], [], 0
            for i, p in enumerate(source.prefixed(chars, n + 1)):
                t0 = time.perf_counter()
                r = await svc.tokenize(TokenizeRequest(model=MODEL, block_size=BS, prompt=p))
                if i:  # the first one brings the shared prefix
                    times.append(time.perf_counter() - t0)
                    tokens.append(r.num_tokens)
                    partial += r.partial
                else:
                    await svc.drain()
                await asyncio.sleep(gap)
            rows.append(_row(size, "prefix handler", early, times, tokens, partial))
    finally:
        await svc.stop()
    return rows


def _baseline(tok: ModelTokenizer, source: TextSource, chars_per_token: float) -> list[Row]:
    rows = []
    for size in SIZES:
        chars, n = int(size * chars_per_token), _runs(size)
        cold = [source.take(chars) for _ in range(n + 3)]
        for p in cold[:3]:  # warm-up, as the service's
            tok.encode(p)
        base, base_keys, tokens = [], [], []
        for p in cold[3:]:
            t0 = time.perf_counter()
            ids = tok.encode(p)
            t1 = time.perf_counter()
            prompt_keys(MODEL, ids, BS)
            t2 = time.perf_counter()
            base.append(t1 - t0)
            base_keys.append(t2 - t0)
            tokens.append(len(ids))
        rows.append(_row(size, "baseline", "-", base, tokens, 0))
        rows.append(_row(size, "baseline+keys", "-", base_keys, tokens, 0))
    return rows


def test_tokenizer_latency(nats_server: NatsServer, model_dir: Path, tmp_path: Path) -> None:
    tok = ModelTokenizer.from_folder(model_dir)
    sample = "\n\n".join(itertools.islice(corpus(98), 300))
    chars_per_token = len(sample) / len(tok.encode(sample))
    # Per size: cold and prefixed texts for two bus runs, back-to-back ones, the handler's
    # prefixed texts twice and the baseline's cold ones (a prefixed set costs ~n/10 texts).
    need = sum(int(s * chars_per_token * 1.02) * (2 * (_runs(s) + 3) + 5 * (_runs(s) // 10 + 3)
                                                  + _runs(s) + 3) for s in SIZES)
    source = TextSource(need)
    rows: list[Row] = []
    for early in ("off", "on"):
        args = ["--early-reply-chars", "0"] if early == "off" else []
        proc = Process("tokenizer", [sys.executable, "-m", "infermesh.services.tokenizer",
                                     "--nats-url", nats_server.url, "--models",
                                     f"{MODEL}={model_dir}", "--http-port", "-1", *args],
                       log=tmp_path / f"tokenizer-{early}.log").start()
        try:
            rows += asyncio.run(_bus_bench(nats_server.url, proc, source, chars_per_token, early))
        finally:
            proc.stop()
    for early in ("off", "on"):
        rows += asyncio.run(_handler_bench(model_dir, source, chars_per_token, early))
    rows += _baseline(tok, source, chars_per_token)
    rows.sort(key=lambda r: r[0])  # by size, in the order they ran
    print(f"\ntokenize + keys (block size {BS}) over the bus, one request at a time; early: "
          f"early replies (partial: how many replies were); baseline: ModelTokenizer.encode in "
          f"this process ({os.cpu_count()} CPUs)")
    print(f"{'tokens':>8} {'mode':<15} {'early':<5} {'n':>4} {'p50 ms':>9} {'p90 ms':>9} "
          f"{'p99 ms':>9} {'mean tokens':>12} {'partial':>7}")
    for size, mode, early, n, p50, p90, p99, tokens, partial in rows:
        print(f"{size:>8} {mode:<15} {early:<5} {n:>4} {p50 * 1e3:>9.3f} {p90 * 1e3:>9.3f} "
              f"{p99 * 1e3:>9.3f} {tokens:>12} {partial:>7}")
