"""The simulator's shared-storage tier in-process: computed blocks reach the directory (and
their STORAGE events the engine's batch), a second engine on the same directory loads them
(timed by the storage bandwidth, counted as vLLM counts them), bad files are misses, capacity
eviction reports removals, back-pressure drops stores."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from infermesh.proto.vllm_kv import EngineEvent
from infermesh.services.sim.block_hash import to_wire
from infermesh.services.sim.config import SimConfig
from infermesh.services.sim.engine import SimEngine, SimRequest
from infermesh.services.sim.metrics import EngineMetrics, vllm_cache_config_labels
from infermesh.services.sim.storage import block_payload

MODEL = "sim-test"
LABELS = {"model_name": MODEL, "engine": "0"}
VOCAB = list(range(100, 600))
BS = 16

_ids = count()
_rng = random.Random(99)


def tokens(n: int) -> list[int]:
    return [_rng.randrange(1000, 30000) for _ in range(n)]


def request(prompt: list[int], max_tokens: int = 1) -> SimRequest:
    return SimRequest(request_id=f"s{next(_ids)}", prompt_ids=prompt, max_tokens=max_tokens)


async def run(engine: SimEngine, req: SimRequest) -> None:
    engine.submit(req)
    while True:
        _, reason = await asyncio.wait_for(req.out.get(), 20)
        if reason is not None:
            return


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.002)


def sample(engine: SimEngine, name: str, **labels: str) -> float:
    value = engine.metrics.registry.get_sample_value(name, {**LABELS, **labels})
    return 0.0 if value is None else value


class Events:
    """Captures what an engine would publish."""

    def __init__(self, engine: SimEngine) -> None:
        self.events: list[EngineEvent] = []
        orig = engine.cache.drain_events
        storage = engine.storage
        assert storage is not None
        sdrain = storage.drain_events

        def drain() -> list[EngineEvent]:
            return orig()

        def sdrain_capture() -> list[EngineEvent]:
            ev = sdrain()
            self.events.extend(ev)
            return ev

        engine.cache.drain_events = drain  # type: ignore[method-assign]
        storage.drain_events = sdrain_capture  # type: ignore[method-assign]

    def of(self, kind: str) -> list[EngineEvent]:
        return [e for e in self.events if e.kind == kind and e.medium == "STORAGE"]


Make = Callable[..., SimEngine]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    made: list[SimEngine] = []

    def build(**kw: Any) -> SimEngine:
        cfg = SimConfig(**{"time_scale": 0.0, "num_gpu_blocks": 4000, "block_size": BS,
                           "storage_dir": str(tmp_path / "kv"), "hash_seed": "0", **kw})
        metrics = EngineMetrics(
            MODEL, 0, vllm_cache_config_labels(block_size=BS, num_gpu_blocks=cfg.num_gpu_blocks),
            max_model_len=cfg.max_model_len, storage_tier=True)
        engine = SimEngine(cfg, 0, MODEL, VOCAB, None, metrics, None)
        engine.start()
        made.append(engine)
        return engine

    yield build
    for e in made:
        await e.stop()


async def test_computed_blocks_are_written_and_reported(make: Make) -> None:
    e = make()
    ev = Events(e)
    prompt = tokens(10 * BS + 3)
    req = request(prompt)
    await run(e, req)
    assert e.storage is not None
    await until(lambda: len(ev.of("stored")) == 10)
    files = set(e.storage.keys())
    assert files == set(req.hashes[:10])
    stored = ev.of("stored")
    assert [s.block_hashes for s in stored] == [[to_wire(h)] for h in req.hashes[:10]]
    # placeholders, as vLLM's connector sends them by default
    assert all(s.token_ids == [] and s.block_size == 0 and s.parent_block_hash is None
               and s.locality == "REMOTE" for s in stored)
    # the payload is the block's: verified against its hash and tokens
    data = e.storage.files.get(req.hashes[3])
    assert data == block_payload(req.hashes[3], prompt[3 * BS:4 * BS], 4096)
    assert sample(e, "vllm:kv_offload_tiering_write_bytes_total", tier="1:fs") == (
        10 * BS * 131_072)


async def test_self_describing_events(make: Make) -> None:
    e = make(storage_self_describing_events=True, storage_locality="LOCAL")
    ev = Events(e)
    prompt = tokens(3 * BS + 1)
    req = request(prompt)
    await run(e, req)
    await until(lambda: len(ev.of("stored")) == 3)
    s = ev.of("stored")[1]
    assert s.block_hashes == [to_wire(req.hashes[1])]
    assert s.parent_block_hash == to_wire(req.hashes[0])
    assert s.token_ids == prompt[BS:2 * BS] and s.block_size == BS
    assert s.locality == "LOCAL"


async def test_second_engine_loads_from_storage(make: Make) -> None:
    a = make()
    prompt = tokens(20 * BS + 5)
    first = request(prompt)
    await run(a, first)
    assert a.storage is not None
    await until(lambda: len(a.storage.keys()) == 20)  # type: ignore[union-attr]
    b = make()
    ev = Events(b)
    second = request(prompt)
    await run(b, second)
    assert second.cached_tokens == 20 * BS and second.storage_tokens == 20 * BS
    assert sample(b, "vllm:prompt_tokens_cached_by_source_total", source="disk") == 20 * BS
    assert sample(b, "vllm:prompt_tokens_cached_by_source_total", source="device") == 0
    assert sample(b, "vllm:external_prefix_cache_hits_total") == 20 * BS
    assert sample(b, "vllm:kv_offload_tiering_chunk_hits_total", tier="1:fs") == 20
    assert sample(b, "vllm:kv_offload_tiering_chunk_queries_total", tier="1:fs") == 20
    assert sample(b, "vllm:kv_offload_tiering_chunk_queries_total", tier="0:primary") == 20
    nbytes = 20 * BS * 131_072
    assert sample(b, "vllm:kv_offload_tiering_read_bytes_total", tier="1:fs") == nbytes
    read_s = sample(b, "vllm:kv_offload_tiering_read_time_total", tier="1:fs")
    assert read_s == pytest.approx(nbytes / 5.0e9)
    # TTFT: the storage read and the host → GPU copy replace the prefill of those tokens
    cfg = b.cfg
    expected = (cfg.request_overhead_s + 5 / cfg.prefill_tokens_per_s
                + 20 * BS * cfg.cached_token_cost_s
                + nbytes / cfg.cpu_load_bytes_per_s + read_s)
    assert second.modelled_ttft == pytest.approx(expected)
    # loaded blocks are not stored again
    await asyncio.sleep(0.05)
    assert ev.of("stored") == []


async def test_corrupt_and_truncated_files_are_misses(make: Make) -> None:
    a = make()
    prompt = tokens(12 * BS + 1)
    first = request(prompt)
    await run(a, first)
    assert a.storage is not None
    await until(lambda: len(a.storage.keys()) == 12)  # type: ignore[union-attr]
    # block 4 corrupted (a byte flipped in its payload), block 8 truncated
    p4 = a.storage.files.path(first.hashes[4])
    raw = bytearray(p4.read_bytes())
    raw[-10] ^= 0xFF
    p4.write_bytes(bytes(raw))
    p8 = a.storage.files.path(first.hashes[8])
    p8.write_bytes(p8.read_bytes()[:50])
    b = make()
    second = request(prompt)
    await run(b, second)
    assert second.cached_tokens == 4 * BS  # blocks 0-3; 4 is bad, recomputed from there
    assert b.storage is not None
    assert b.storage.files.stats.corrupt == 1
    # removed, never served (b may already have recomputed block 4 and written it anew)
    assert not p4.exists() or p4.read_bytes() != bytes(raw)
    assert sample(b, "vllm:kv_offload_tiering_promotion_job_failures_total", tier="1:fs") == 1
    # the truncated one is found on the next lookup that reaches it (block 4 recomputed and
    # rewritten by b meanwhile)
    await until(lambda: p4.exists())
    c = make()
    third = request(prompt)
    await run(c, third)
    assert third.cached_tokens == 8 * BS
    assert c.storage is not None and c.storage.files.stats.corrupt == 1


async def test_capacity_eviction_reports_removals(make: Make) -> None:
    per_file = 4096 + 60  # payload + header + key, about
    e = make(storage_capacity_bytes=10 * per_file)
    ev = Events(e)
    for _ in range(3):
        await run(e, request(tokens(6 * BS + 1)))
    await until(lambda: len(ev.of("stored")) == 18)
    await until(lambda: bool(ev.of("removed")))
    removed = [h for r in ev.of("removed") for h in r.block_hashes]
    assert e.storage is not None
    left = {to_wire(k) for k in e.storage.keys()}
    assert removed and not set(removed) & left
    assert len(left) <= 10
    assert all(r.locality == "REMOTE" for r in ev.of("removed"))


async def test_backpressure_drops_stores(make: Make) -> None:
    # writes of 2 MiB blocks at 1 MB/s: a second store while the first is queued is dropped
    e = make(storage_write_bytes_per_s=1e6, storage_max_write_backlog_s=1.0, time_scale=1.0)
    e.submit(request(tokens(2 * BS + 1)))
    await run(e, request(tokens(2 * BS + 1)))
    await until(lambda: sample(
        e, "vllm:kv_offload_tiering_backpressure_stores_dropped_total", tier="1:fs") == 1)
    assert sample(e, "vllm:kv_offload_tiering_backpressure_blocks_dropped_total",
                  tier="1:fs") == 2


async def test_a_storage_read_does_not_hold_the_gpu_queue(make: Make) -> None:
    a = make()
    prompt = tokens(20 * BS + 1)
    await run(a, request(prompt))
    assert a.storage is not None
    await until(lambda: len(a.storage.keys()) == 20)  # type: ignore[union-attr]
    # B reads 40 MiB at 100 MB/s: 0.42 modelled s (42 ms here); a fresh short prompt behind
    # it in the queue is computed meanwhile, as vLLM schedules others while one loads
    b = make(storage_read_bytes_per_s=1e8, time_scale=0.1)
    slow, quick = request(prompt), request(tokens(BS + 1))
    b.submit(slow)
    await until(lambda: slow.alloc is not None)
    done: list[SimRequest] = []

    async def finish(r: SimRequest) -> None:
        await run(b, r) if r is quick else await _wait(r)
        done.append(r)

    await asyncio.gather(finish(slow), finish(quick))
    assert done == [quick, slow]
    assert slow.storage_tokens == 20 * BS


async def _wait(req: SimRequest) -> None:
    while True:
        _, reason = await asyncio.wait_for(req.out.get(), 20)
        if reason is not None:
            return


async def test_a_failing_disk_counts_failed_stores_and_the_engine_serves_on(make: Make) -> None:
    e = make()
    assert e.storage is not None
    prompt = tokens(3 * BS + 1)
    first_block = e.prompt_hashes(request(prompt))[0]
    # a file where the block's shard directory goes: its write fails, as on a broken mount
    e.storage.files.path(first_block).parent.write_bytes(b"not a directory")
    await run(e, request(prompt))
    await until(lambda: sample(e, "vllm:kv_offload_tiering_cascade_job_failures_total",
                               tier="1:fs") == 1)
    assert e.storage.files.stats.write_errors == 1
    again = request(prompt)
    await run(e, again)  # still serving, from its GPU
    assert again.cached_tokens == 3 * BS
