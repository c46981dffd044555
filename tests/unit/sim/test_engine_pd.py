"""Two SimEngines in-process as a prefill and a decode engine, the decode's reads wired straight
to the prefill's (no HTTP): the held blocks and their lease, the modelled read, the blocks the
decode caches, failures under vLLM's "fail" policy, aborts that free the prefill's blocks,
heartbeats, and the connector's metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from itertools import count
from typing import Any

import pytest

from infermesh.services.sim.config import SimConfig
from infermesh.services.sim.engine import SimEngine, SimRequest
from infermesh.services.sim.kv_client import PullOutcome
from infermesh.services.sim.metrics import EngineMetrics, vllm_cache_config_labels
from infermesh.services.sim.nixl import RemotePrefill, remote_prefill

MODEL = "sim-test"
VOCAB = list(range(100, 600))
BS = 16
_ids = count()


class WiredClient:
    """The decode engine's client, reading straight from a prefill engine."""

    def __init__(self, prefill: SimEngine | None, outcome: PullOutcome | None = None) -> None:
        self.prefill = prefill
        self.outcome = outcome
        self.pulls: list[RemotePrefill] = []
        self.beats: list[list[str]] = []

    async def pull(self, remote: RemotePrefill) -> PullOutcome:
        self.pulls.append(remote)
        if self.outcome is not None:
            return self.outcome
        assert self.prefill is not None
        try:
            got = self.prefill.read_held(remote.request_id, remote.engine_id,
                                         list(remote.block_ids))
        except ValueError:
            return PullOutcome.FAILED
        return PullOutcome.STALE if got is None else PullOutcome.LOADED

    async def heartbeat(self, host: str, port: int, engine_id: str, ids: list[str]) -> None:
        self.beats.append(ids)
        if self.prefill is not None:
            self.prefill.extend_leases(engine_id, ids)

    async def close(self) -> None:
        pass


Make = Callable[..., SimEngine]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    made: list[SimEngine] = []

    def build(client: Any = None, **kw: Any) -> SimEngine:
        cfg = SimConfig(**{"time_scale": 0.02, "num_gpu_blocks": 2000, "block_size": BS,
                           "kv_connector": True, **kw})
        metrics = EngineMetrics(MODEL, 0, vllm_cache_config_labels(
            block_size=BS, num_gpu_blocks=cfg.num_gpu_blocks), kv_connector=cfg.kv_connector)
        e = SimEngine(cfg, 0, MODEL, VOCAB, None, metrics, None,
                      kv_address=("127.0.0.1", 8000), kv_client=client)
        e.start()
        made.append(e)
        return e

    yield build
    for e in made:
        await e.stop()


def prompt(n: int) -> list[int]:
    base = 1000 + 40 * next(_ids)
    return [base + i % 37 for i in range(n)]


async def finish(req: SimRequest, timeout: float = 10.0) -> list[tuple[int | None, str | None]]:
    out = []
    while True:
        pair = await asyncio.wait_for(req.out.get(), timeout)
        out.append(pair)
        if pair[1] is not None:
            return out


def sample(e: SimEngine, name: str, **labels: str) -> float:
    v = e.metrics.registry.get_sample_value(name, {"model_name": MODEL, "engine": "0", **labels})
    return 0.0 if v is None else v


async def prefilled(p: SimEngine, ids: list[int]) -> SimRequest:
    req = SimRequest(request_id=f"p{next(_ids)}", prompt_ids=ids, max_tokens=1,
                     remote_decode=True)
    p.submit(req)
    assert (await finish(req))[-1][1] == "length"
    return req


async def test_prefill_holds_its_blocks_and_the_decode_reads_them(make) -> None:
    p = make()
    client = WiredClient(p)
    d = make(client)
    ids = prompt(100)
    preq = await prefilled(p, ids)
    params = preq.kv_params
    assert params is not None and params["remote_num_tokens"] == 100
    assert len(params["remote_block_ids"][0]) == 7
    assert params["remote_engine_id"] == p.engine_id and params["remote_port"] == 8000
    assert p.cache.used > 0 and len(p.leases) == 1  # held: counted in KV usage

    remote = remote_prefill(params)
    dreq = SimRequest(request_id="d1", prompt_ids=ids, max_tokens=4, remote_prefill=remote)
    d.submit(dreq)
    out = await finish(dreq)
    assert [r for _, r in out] == [None, None, None, "length"]
    assert len(client.pulls) == 1
    assert p.cache.used == 0 and len(p.leases) == 0  # released by the read
    # the read is modelled per block past the local hit, then one decode step
    cfg = d.cfg
    xfer = 7 * BS * cfg.kv_bytes_per_token / cfg.kv_transfer_bytes_per_s
    assert dreq.modelled_ttft == pytest.approx(cfg.request_overhead_s + xfer + cfg.itl_s
                                               + cfg.itl_per_seq_s * 0, rel=0.05)
    assert sample(d, "vllm:nixl_xfer_time_seconds_sum") == pytest.approx(xfer)
    assert sample(d, "vllm:nixl_bytes_transferred_sum") == 7 * BS * cfg.kv_bytes_per_token
    assert sample(d, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer") == 100
    assert sample(d, "vllm:prompt_tokens_by_source_total", source="local_compute") == 0
    assert sample(d, "vllm:prompt_tokens_cached_by_source_total", source="p2p") == 100
    assert sample(d, "vllm:external_prefix_cache_queries_total") == 100
    # the prefill engine asked its connector too, and found nothing remote
    assert sample(p, "vllm:external_prefix_cache_queries_total") == 100
    assert sample(p, "vllm:external_prefix_cache_hits_total") == 0
    # the decode engine now holds the prompt's full blocks, as vLLM caches loaded blocks
    assert set(dreq.hashes) <= set(d.cache.blocks)
    assert d.reported_cached(dreq) == 0  # the prefill engine's own hits


async def test_a_second_decode_of_the_prompt_reads_only_what_it_lacks(make) -> None:
    p = make()
    d = make(WiredClient(p))
    ids = prompt(100)
    for n in (1, 2):
        preq = await prefilled(p, ids)
        dreq = SimRequest(request_id=f"d{n}", prompt_ids=ids, max_tokens=2,
                          remote_prefill=remote_prefill(preq.kv_params))
        d.submit(dreq)
        await finish(dreq)
    assert dreq.cached_tokens == 96 and dreq.external_tokens == 4
    assert preq.cached_tokens == 96  # the prefill engine hit its own cache
    assert d.reported_cached(dreq) == 96  # reported from the prefill's answer
    assert sample(d, "vllm:nixl_bytes_transferred_sum") == \
        (7 + 1) * BS * d.cfg.kv_bytes_per_token


async def test_a_failed_read_ends_the_request_in_error_and_frees_its_blocks(make) -> None:
    d = make(WiredClient(None, PullOutcome.FAILED))
    remote = RemotePrefill("e", "r", "127.0.0.1", 9, (1, 2, 3, 4), 0)
    dreq = SimRequest(request_id="d1", prompt_ids=prompt(60), max_tokens=4, remote_prefill=remote)
    d.submit(dreq)
    assert await finish(dreq) == [(None, "error")]
    assert d.cache.used == 0 and not d.fetching and not d.running
    assert sample(d, "vllm:nixl_num_failed_transfers_total") == 1
    assert sample(d, "vllm:request_success_total", finished_reason="error") == 1
    assert sample(d, "vllm:prompt_tokens_total") == 0
    assert not set(dreq.hashes) & set(d.cache.blocks)  # nothing was loaded, nothing cached


async def test_a_read_after_the_lease_ran_out_goes_on_and_is_counted_on_the_prefill(make) -> None:
    p = make(kv_lease_s=0.02)
    d = make(WiredClient(p))
    ids = prompt(50)
    preq = await prefilled(p, ids)
    for _ in range(300):
        if not len(p.leases):
            break
        await asyncio.sleep(0.01)
    assert p.cache.used == 0 and sample(p, "vllm:nixl_num_kv_expired_reqs_total") == 1
    dreq = SimRequest(request_id="d1", prompt_ids=ids, max_tokens=2,
                      remote_prefill=remote_prefill(preq.kv_params))
    d.submit(dreq)
    assert (await finish(dreq))[-1][1] == "length"
    assert sample(p, "vllm:nixl_num_notifications_after_expiry_total") == 1


async def test_naming_other_blocks_or_another_engine_fails_the_read(make) -> None:
    p = make()
    d = make(WiredClient(p))
    preq = await prefilled(p, prompt(50))
    assert preq.kv_params is not None
    for change in ({"remote_engine_id": "someone-else"}, {"remote_block_ids": [[999]]}):
        dreq = SimRequest(request_id=f"d{next(_ids)}", prompt_ids=prompt(50), max_tokens=2,
                          remote_prefill=remote_prefill({**preq.kv_params, **change}))
        d.submit(dreq)
        assert await finish(dreq) == [(None, "error")]


async def test_a_decode_aborted_before_its_read_frees_the_prefills_blocks(make) -> None:
    p = make()
    client = WiredClient(p)
    # a slow link (time_scale 1): the read waits about 0.5 s
    d = make(client, time_scale=1.0, kv_transfer_bytes_per_s=5e6)
    preq = await prefilled(p, prompt(20))
    dreq = SimRequest(request_id="d1", prompt_ids=prompt(20), max_tokens=2,
                      remote_prefill=remote_prefill(preq.kv_params))
    d.submit(dreq)
    for _ in range(200):
        if d.fetching:
            break
        await asyncio.sleep(0.005)
    assert d.fetching and len(p.leases) == 1
    d.abort(dreq)
    for _ in range(200):
        if not len(p.leases):
            break
        await asyncio.sleep(0.005)
    assert len(p.leases) == 0 and p.cache.used == 0 and d.cache.used == 0
    assert not d.fetching


async def test_a_prefill_aborted_or_without_remote_decode_keeps_nothing(make) -> None:
    p = make()
    plain = SimRequest(request_id="plain", prompt_ids=prompt(40), max_tokens=1)
    p.submit(plain)
    await finish(plain)
    assert plain.kv_params is None and len(p.leases) == 0 and p.cache.used == 0
    long = SimRequest(request_id="long", prompt_ids=prompt(40), max_tokens=10_000,
                      remote_decode=True)
    p.submit(long)
    await asyncio.wait_for(long.out.get(), 10)
    p.abort(long)
    assert long.kv_params is None and len(p.leases) == 0 and p.cache.used == 0


async def test_waiting_decodes_heartbeat_their_leases(make) -> None:
    p = make(kv_lease_s=0.3)
    client = WiredClient(p)
    # lease / 6 = 50 ms between heartbeats; the read takes about 0.4 s of wall time
    d = make(client, time_scale=1.0, kv_transfer_bytes_per_s=1e7, kv_lease_s=0.3)
    ids = prompt(30)
    preq = await prefilled(p, ids)
    dreq = SimRequest(request_id="d1", prompt_ids=ids, max_tokens=2,
                      remote_prefill=remote_prefill(preq.kv_params))
    d.submit(dreq)
    assert (await finish(dreq))[-1][1] == "length"
    assert [preq.request_id] in client.beats
    assert sample(p, "vllm:nixl_num_kv_expired_reqs_total") == 0  # kept alive past 0.3 s


def test_the_connector_families_exist_only_with_a_connector() -> None:
    def names(kv: bool) -> set[str]:
        m = EngineMetrics(MODEL, 0, vllm_cache_config_labels(block_size=BS, num_gpu_blocks=10),
                          kv_connector=kv)
        return {f.name for f in m.registry.collect()}

    nixl = {"vllm:nixl_xfer_time_seconds", "vllm:nixl_post_time_seconds",
            "vllm:nixl_bytes_transferred", "vllm:nixl_num_descriptors",
            "vllm:nixl_num_failed_transfers", "vllm:nixl_num_failed_notifications",
            "vllm:nixl_num_kv_expired_reqs", "vllm:nixl_num_notifications_after_expiry",
            "vllm:num_requests_kv_fetch_by_stage"}
    assert nixl <= names(True)
    assert not nixl & names(False)
