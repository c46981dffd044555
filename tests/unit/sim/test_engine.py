"""SimEngine in-process: the latency model against the calibration note, FIFO prefill queueing,
continuous-batching limits, finish reasons, aborts, generated-block caching and cache overflow.

Timing checks read the engine's modelled values (``req.modelled_ttft``, or the histograms with
``time_scale=0``, where the engine records modelled seconds); wall-clock checks only compare
orderings with generous margins, and lean on wall time never running ahead of the model.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from itertools import count
from typing import Any

import pytest

from infermesh.services.sim.config import SimConfig
from infermesh.services.sim.engine import SimEngine, SimRequest
from infermesh.services.sim.metrics import EngineMetrics, vllm_cache_config_labels

MODEL = "sim-test"
LABELS = {"model_name": MODEL, "engine": "0"}
VOCAB = list(range(100, 600))
BS = 16

_ids = count()
_tok_rng = random.Random(1234)


def tokens(n: int) -> list[int]:
    """A prompt no other test prompt shares a block with."""
    return [_tok_rng.randrange(1000, 30000) for _ in range(n)]


def request(prompt: list[int], max_tokens: int = 1, **kw: Any) -> SimRequest:
    return SimRequest(request_id=f"r{next(_ids)}", prompt_ids=prompt, max_tokens=max_tokens, **kw)


async def collect(req: SimRequest, timeout: float = 20.0) -> list[tuple[int | None, str | None]]:
    """Every (token, finish_reason) pair up to and including the one with a reason."""
    out: list[tuple[int | None, str | None]] = []
    while True:
        pair = await asyncio.wait_for(req.out.get(), timeout)
        out.append(pair)
        if pair[1] is not None:
            return out


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def sample(engine: SimEngine, name: str, **labels: str) -> float:
    value = engine.metrics.registry.get_sample_value(name, {**LABELS, **labels})
    return 0.0 if value is None else value


MakeEngine = Callable[..., SimEngine]


@pytest.fixture
async def make_engine() -> AsyncIterator[MakeEngine]:
    """Build and start engines (time_scale 0.02, 4,000 blocks unless told); stopped after."""
    made: list[SimEngine] = []

    def make(**kw: Any) -> SimEngine:
        cfg = SimConfig(**{"time_scale": 0.02, "num_gpu_blocks": 4000, "block_size": BS, **kw})
        metrics = EngineMetrics(
            MODEL, 0,
            vllm_cache_config_labels(block_size=cfg.block_size,
                                     num_gpu_blocks=cfg.num_gpu_blocks),
            max_model_len=cfg.max_model_len)
        engine = SimEngine(cfg, 0, MODEL, VOCAB, None, metrics, None)
        engine.start()
        made.append(engine)
        return engine

    yield make
    for e in made:
        await e.stop()


# ---------------------------------------------------------------------- the calibration note


def test_defaults_match_the_calibration_note() -> None:
    cfg = SimConfig()
    assert 25_000 <= cfg.prefill_tokens_per_s <= 35_000  # ~30k tok/s (28-34k measured)
    assert 0.005 <= cfg.request_overhead_s <= 0.03  # ~15 ms
    assert 0.006 <= cfg.itl_s <= 0.008  # published 6-8 ms ITL for 8B on one H100
    assert cfg.kv_bytes_per_token == 131_072  # 128 KiB per token for the 8B model in bf16
    assert cfg.time_scale == 1.0


async def test_uncached_and_cached_prefill_match_the_measurements(make_engine) -> None:
    e = make_engine()  # default latency knobs
    prefix = tokens(6000)
    cold = request(prefix)
    e.submit(cold)
    await collect(cold)
    # 6,000 uncached tokens measured 182.5 ms of prefill; with ~15 ms overhead ≈ 0.2 s.
    assert cold.cached_tokens == 0
    assert 0.17 <= cold.modelled_ttft <= 0.25, cold.modelled_ttft

    # 1,200 new tokens on the cached 6,000-token prefix vs all 7,200 uncached: 3.9× measured.
    suffix = tokens(1200)
    hit = request(prefix + suffix)
    e.submit(hit)
    await collect(hit)
    assert hit.cached_tokens == 6000
    full = request(tokens(7200))
    e.submit(full)
    await collect(full)
    assert full.cached_tokens == 0
    assert 0.2 <= full.modelled_ttft <= 0.3, full.modelled_ttft
    assert full.modelled_ttft >= 3 * hit.modelled_ttft, (full.modelled_ttft, hit.modelled_ttft)
    # ... and the hit still pays for attention over the prefix: dearer than 1,200 cold tokens.
    assert hit.modelled_ttft > e.cfg.request_overhead_s + 1200 / e.cfg.prefill_tokens_per_s


async def test_modelled_ttft_and_itl_land_in_the_histograms(make_engine) -> None:
    # time_scale=0: the engine records modelled seconds, so the histograms are exact.
    e = make_engine(time_scale=0)
    r = request(tokens(6000), max_tokens=11)
    e.submit(r)
    out = await collect(r)
    assert len(out) == 11 and out[-1][1] == "length"
    assert sample(e, "vllm:time_to_first_token_seconds_count") == 1
    ttft = sample(e, "vllm:time_to_first_token_seconds_sum")
    assert ttft == pytest.approx(r.modelled_ttft)
    assert 0.17 <= ttft <= 0.25
    assert sample(e, "vllm:time_to_first_token_seconds_bucket", le="0.25") == 1
    assert sample(e, "vllm:time_to_first_token_seconds_bucket", le="0.1") == 0
    n_itl = sample(e, "vllm:inter_token_latency_seconds_count")
    assert n_itl == 10
    itl = sample(e, "vllm:inter_token_latency_seconds_sum") / n_itl
    assert 0.006 <= itl <= 0.008, itl  # ≈ 7 ms with one running sequence
    assert sample(e, "vllm:generation_tokens_total") == 11
    assert sample(e, "vllm:request_success_total", finished_reason="length") == 1
    assert sample(e, "vllm:prompt_tokens_total") == 6000


async def test_every_step_observes_the_tokens_it_computed(make_engine) -> None:
    # vLLM's vllm:iteration_tokens_total: per step, the prompt tokens whose prefill ends in
    # it (cached ones excluded) plus the tokens it generates.
    e = make_engine(time_scale=0)
    prompt = tokens(100)
    first = request(prompt, max_tokens=5)
    e.submit(first)
    await collect(first)
    again = request(list(prompt), max_tokens=3)
    e.submit(again)
    await collect(again)
    assert again.cached_tokens == 96  # six full blocks; the last prompt token is recomputed
    assert sample(e, "vllm:iteration_tokens_total_count") == 5 + 3  # one token per step
    assert sample(e, "vllm:iteration_tokens_total_sum") == (100 + 5) + (100 - 96 + 3)
    assert sample(e, "vllm:iteration_tokens_total_bucket", le="1.0") == 4 + 2  # decode steps


async def test_kv_pressure_queues_requests_instead_of_preempting(make_engine) -> None:
    # Each request reserves its output's blocks when admitted, so a full cache makes the
    # next one wait; nothing is ever preempted, and the preemption metrics stay at 0.
    e = make_engine(time_scale=0.05, num_gpu_blocks=12)
    reqs = [request(tokens(40), max_tokens=40) for _ in range(3)]  # 5 blocks each
    for r in reqs:
        e.submit(r)
    results = await asyncio.wait_for(asyncio.gather(*(collect(r) for r in reqs)), 20)
    assert all(out[-1][1] == "length" and len(out) == 40 for out in results)
    # the third was admitted only once one of the first two had finished
    assert reqs[2].scheduled_at >= min(r.last_token_at for r in reqs[:2])
    assert sample(e, "vllm:num_preemptions_total") == 0
    assert sample(e, "vllm:request_num_preemptions_count") == 3
    assert sample(e, "vllm:request_num_preemptions_sum") == 0


# ---------------------------------------------------------------------- prefix cache


@pytest.mark.parametrize("extra", [0, 4])
async def test_cached_prefix_lowers_ttft_and_counts_whole_blocks(make_engine, extra) -> None:
    e = make_engine(time_scale=0)
    base = tokens(30 * BS + extra)
    first = request(base)
    e.submit(first)
    await collect(first)
    assert first.cached_tokens == 0

    again = request(list(base))
    gpu_hit, cpu_hit = e.cache.match(e.hasher.hash_prompt(base, BS), len(base))
    # The last prompt token is always recomputed: a block-aligned prompt loses its last block.
    assert gpu_hit == (30 if extra else 29) and cpu_hit == 0
    e.submit(again)
    await collect(again)
    assert again.cached_tokens == gpu_hit * BS
    assert again.modelled_ttft < first.modelled_ttft
    assert sample(e, "vllm:prefix_cache_queries_total") == 2 * len(base)
    assert sample(e, "vllm:prefix_cache_hits_total") == gpu_hit * BS


async def test_partial_prefix_hit_counts_only_the_shared_blocks(make_engine) -> None:
    e = make_engine(time_scale=0)
    shared = tokens(10 * BS + 5)  # 10 full blocks, then a partial one
    a = request(shared + tokens(40))
    e.submit(a)
    await collect(a)
    b = request(shared + tokens(40))  # diverges inside block 11
    e.submit(b)
    await collect(b)
    assert b.cached_tokens == 10 * BS
    assert b.modelled_ttft < a.modelled_ttft


# ---------------------------------------------------------------------- scheduling


async def test_fifo_prefill_makes_ttft_grow_with_concurrent_long_prompts(make_engine) -> None:
    scale = 0.1
    e = make_engine(time_scale=scale)
    reqs = [request(tokens(6000)) for _ in range(4)]
    for r in reqs:
        e.submit(r)
    await asyncio.gather(*(collect(r) for r in reqs))
    # The same work for each: the model alone sees no queueing...
    assert len({round(r.modelled_ttft, 9) for r in reqs}) == 1
    # ... but prefills run one at a time, so they finish in order, ≈ one prefill apart.
    firsts = [r.first_token_at for r in reqs]
    assert firsts == sorted(firsts)
    ttfts = [(r.first_token_at - r.arrival) / scale for r in reqs]  # in modelled seconds
    prefill = reqs[0].modelled_ttft - e.cfg.request_overhead_s
    for i, t in enumerate(ttfts):
        # Wall time never runs ahead of the model: the i-th waited for i prefills before it.
        # (Only lower bounds: a loaded machine may delay any of them further.)
        assert t >= reqs[0].modelled_ttft + i * prefill * 0.95, (i, ttfts)
    assert ttfts[3] >= 3.5 * reqs[0].modelled_ttft, ttfts  # 0.815 s vs 0.215 s modelled
    # The TTFT histogram saw the queueing too (≥ 0.215 + 0.415 + 0.615 + 0.815 modelled s).
    assert sample(e, "vllm:time_to_first_token_seconds_sum") >= 0.95 * sum(
        reqs[0].modelled_ttft + i * prefill for i in range(4))


async def test_max_num_seqs_caps_running_and_the_rest_wait(make_engine) -> None:
    e = make_engine(time_scale=1.0, max_num_seqs=2)  # real time: nothing finishes in the test
    reqs = [request(tokens(40), max_tokens=10_000) for _ in range(5)]
    for r in reqs:
        e.submit(r)
    await until(lambda: sample(e, "vllm:num_requests_running") == 2
                and sample(e, "vllm:num_requests_waiting") == 3, what="gauges 2 running/3 waiting")
    assert e.running == reqs[:2]
    assert list(e.waiting) == reqs[2:]
    assert sample(e, "vllm:num_requests_waiting_by_reason", reason="capacity") == 3
    assert e.cache.used > 0
    # Aborting a running request frees its seat: the head of the queue moves in (FIFO).
    e.abort(reqs[0])
    assert await collect(reqs[0]) == [(None, "abort")]
    await until(lambda: len(e.running) == 2 and len(e.waiting) == 2, what="next admitted")
    assert e.running == [reqs[1], reqs[2]]
    # Aborting a waiting request takes it out of the queue without running it.
    e.abort(reqs[4])
    assert await collect(reqs[4]) == [(None, "abort")]
    assert list(e.waiting) == [reqs[3]] and reqs[4].alloc is None
    for r in reqs[1:4]:
        e.abort(r)
    await until(lambda: sample(e, "vllm:num_requests_running") == 0
                and sample(e, "vllm:num_requests_waiting") == 0, what="gauges back to zero")
    assert e.cache.used == 0 and not e.running and not e.waiting


async def test_continuous_batching_runs_up_to_max_num_seqs_together(make_engine) -> None:
    e = make_engine(time_scale=0.01, max_num_seqs=3)
    reqs = [request(tokens(20), max_tokens=8) for _ in range(7)]
    for r in reqs:
        e.submit(r)
    seen: set[int] = set()

    async def watch() -> None:
        while True:
            seen.add(len(e.running))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*(collect(r) for r in reqs))
    finally:
        watcher.cancel()
    assert max(seen) == 3
    assert all(len(out) == 8 and out[-1][1] == "length" for out in results)
    assert sample(e, "vllm:request_success_total", finished_reason="length") == 7
    assert e.cache.used == 0


# ---------------------------------------------------------------------- finish reasons


async def test_max_tokens_finishes_with_length(make_engine) -> None:
    e = make_engine()
    r = request(tokens(30), max_tokens=5)
    e.submit(r)
    out = await collect(r)
    assert [reason for _, reason in out] == [None, None, None, None, "length"]
    assert all(tok in VOCAB for tok, _ in out)
    assert r.output_ids == [tok for tok, _ in out]
    assert e.cache.used == 0


async def test_stop_token_ids_finish_with_stop(make_engine) -> None:
    e = make_engine(time_scale=0)
    stop = frozenset({VOCAB[3], VOCAB[7]})
    r = request(tokens(30), max_tokens=2_000, stop_token_ids=stop, seed=5)
    e.submit(r)
    out = await collect(r)
    toks = [t for t, _ in out]
    assert out[-1][1] == "stop" and toks[-1] in stop
    assert not stop.intersection(toks[:-1]) and all(reason is None for _, reason in out[:-1])
    assert sample(e, "vllm:request_success_total", finished_reason="stop") == 1

    # A seed makes the output reproducible.
    r2 = request(r.prompt_ids, max_tokens=2_000, stop_token_ids=stop, seed=5)
    e.submit(r2)
    assert [t for t, _ in await collect(r2)] == toks


async def test_stop_token_on_the_last_allowed_token_is_stop(make_engine) -> None:
    e = make_engine(time_scale=0)
    r = request(tokens(10), max_tokens=1, stop_token_ids=frozenset(VOCAB))
    e.submit(r)
    assert (await collect(r))[-1][1] == "stop"


# ---------------------------------------------------------------------- blocks


async def test_abort_frees_blocks(make_engine) -> None:
    e = make_engine(time_scale=1.0)
    r = request(tokens(10 * BS + 3), max_tokens=10_000)
    e.submit(r)
    await until(lambda: bool(r.output_ids), what="first token")
    assert e.cache.used == -(-(10 * BS + 3 + 10_000) // BS)  # prompt + reserved output
    e.abort(r)
    out = await collect(r)
    assert out[-1] == (None, "abort")
    assert e.cache.used == 0 and not e.running
    # The prompt's full blocks stay cached (evictable), as in vLLM.
    assert len(e.cache.blocks) == 10
    e.abort(r)  # a second abort is harmless
    assert r.out.empty()
    await until(lambda: sample(e, "vllm:kv_cache_usage_perc") == 0, what="kv usage 0")
    assert sample(e, "vllm:request_success_total", finished_reason="abort") == 1


async def test_generated_tokens_complete_blocks_that_get_cached(make_engine) -> None:
    e = make_engine(time_scale=0)
    prompt = tokens(BS + 4)  # one full block and 4 tokens
    r = request(prompt, max_tokens=40)
    e.submit(r)
    await collect(r)
    assert len(e.cache.blocks) == 1 + 2  # 60 tokens, 59 computed: 3 full blocks in all
    assert e.cache.used == 0
    # The generated blocks chain to the prompt's, hashed as a prompt would be: a new prompt
    # that repeats the conversation hits all three.
    seq = prompt + r.output_ids
    again = request(seq[: 3 * BS] + tokens(5))
    e.submit(again)
    await collect(again)
    assert again.cached_tokens == 3 * BS


async def test_time_scale_zero_serves_many_requests(make_engine) -> None:
    e = make_engine(time_scale=0, max_num_seqs=8)
    shared = tokens(8 * BS)
    reqs = [request(shared + tokens(20), max_tokens=16) for _ in range(40)]
    for r in reqs:
        e.submit(r)
    results = await asyncio.wait_for(asyncio.gather(*(collect(r) for r in reqs)), 20)
    assert all(len(out) == 16 and out[-1][1] == "length" for out in results)
    assert sum(r.cached_tokens for r in reqs) >= 39 * 8 * BS - 8 * 8 * BS  # most hit the prefix
    assert sample(e, "vllm:request_success_total", finished_reason="length") == 40
    assert sample(e, "vllm:time_to_first_token_seconds_count") == 40
    assert e.cache.used == 0 and not e.running and not e.waiting


async def test_request_that_never_fits_is_aborted_not_stuck(make_engine) -> None:
    e = make_engine(time_scale=0.5, num_gpu_blocks=10)  # 160 tokens of KV in all
    running = request(tokens(40), max_tokens=40)  # ≈ 0.15 s of wall time
    huge = request(tokens(200))  # more blocks than the whole cache
    too_long = request(tokens(100), max_tokens=100)  # prompt fits, prompt + output does not
    small = request(tokens(40), max_tokens=3)
    for r in (running, huge, too_long, small):
        e.submit(r)
    # The head-of-line request waits while something runs (space may free up) ...
    await until(lambda: bool(running.output_ids), what="first request running")
    assert e.waiting[0] is huge
    # ... then is refused once nothing could ever make room, and the queue moves on.
    assert await collect(huge) == [(None, "abort")]
    assert await collect(too_long) == [(None, "abort")]
    assert (await collect(running))[-1][1] == "length"
    assert (await collect(small))[-1][1] == "length"
    assert huge.alloc is None and e.cache.used == 0 and not e.waiting


async def test_lone_request_that_never_fits_is_aborted_at_once(make_engine) -> None:
    e = make_engine(time_scale=1.0, num_gpu_blocks=4)
    r = request(tokens(100))
    e.submit(r)
    assert await collect(r, timeout=5) == [(None, "abort")]
    ok = request(tokens(30), max_tokens=2)
    e.submit(ok)
    assert (await collect(ok))[-1][1] == "length"


async def test_unknown_lora_is_refused_at_submit(make_engine) -> None:
    e = make_engine(loras=["adapter1"])
    with pytest.raises(ValueError):
        e.submit(request(tokens(10), lora_name="nope"))
    r = request(tokens(40), lora_name="adapter1")
    e.submit(r)
    assert (await collect(r))[-1][1] == "length"
    # The adapter is part of the block hashes: the same tokens on the base model do not hit.
    base = request(list(r.prompt_ids))
    e.submit(base)
    await collect(base)
    assert base.cached_tokens == 0


async def test_stop_aborts_everything(make_engine) -> None:
    e = make_engine(time_scale=1.0, max_num_seqs=1)
    a = request(tokens(20), max_tokens=10_000)
    b = request(tokens(20), max_tokens=10_000)
    e.submit(a)
    e.submit(b)
    await until(lambda: bool(a.output_ids), what="first token")
    await e.stop()
    assert (await collect(a))[-1] == (None, "abort")
    assert await collect(b) == [(None, "abort")]
    assert e.cache.used == 0


async def test_cpu_tier_hits_count_as_host(make_engine) -> None:
    e = make_engine(num_gpu_blocks=12, num_cpu_blocks=40, time_scale=0.0)
    first = tokens(8 * BS + 1)
    await collect_req(e, request(first))
    await collect_req(e, request(tokens(10 * BS + 1)))  # pushes the first prompt to CPU
    again = request(first)
    await collect_req(e, again)
    assert again.cached_tokens == 8 * BS
    gpu = sample(e, "vllm:prompt_tokens_cached_by_source_total", source="device")
    host = sample(e, "vllm:prompt_tokens_cached_by_source_total", source="host")
    assert gpu + host == 8 * BS and host > 0
    assert sample(e, "vllm:external_prefix_cache_hits_total") == host
    assert sample(e, "vllm:prefix_cache_hits_total") == gpu


async def collect_req(e: SimEngine, req: SimRequest) -> None:
    e.submit(req)
    await collect(req)
