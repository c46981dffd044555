"""Which engine process the agent mirrors, decided from the replay buffer: one AllBlocksCleared
per engine process, never one per idle check, never carrying the old engine's seq; and how a
failed /metrics scrape changes the heartbeat's readiness (slow vs gone)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import aiohttp
import pytest

from infermesh.proto import codec
from infermesh.proto.messages import AllBlocksCleared, BlockStored, KVEventBatch
from infermesh.proto.vllm_kv import EngineEvent, VllmEventEncoder
from infermesh.services.agent.config import AgentConfig
from infermesh.services.agent.kvstream import RawBatch
from infermesh.services.agent.scrape import EngineLoad
from infermesh.services.agent.service import AgentService


class FakeBus:
    """What the agent publishes, decoded."""

    max_payload = 1 << 20

    def __init__(self) -> None:
        self.batches: list[KVEventBatch] = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.batches.append(codec.decode(data, KVEventBatch))

    def cleared(self) -> list[KVEventBatch]:
        return [b for b in self.batches if any(isinstance(e, AllBlocksCleared) for e in b.events)]


class FakeEngine:
    """An engine process as its replay socket shows it; ``up=False``: the socket is away."""

    def __init__(self, first_hash: int = 1000) -> None:
        self.buffer: list[RawBatch] = []
        self.up = True
        self._enc = VllmEventEncoder()
        self._next = first_hash

    def store(self, n: int = 1) -> RawBatch:
        hashes = list(range(self._next, self._next + n))
        self._next += n
        payload = self._enc.encode(time.time(), [EngineEvent(
            "stored", block_hashes=hashes, token_ids=[7] * (2 * n), block_size=2)])
        batch = (len(self.buffer), payload)
        self.buffer.append(batch)
        return batch


class Harness:
    def __init__(self, **cfg: object) -> None:
        self.engine = FakeEngine()
        self.bus = FakeBus()
        self.agent = AgentService(AgentConfig(pod="p", model="m", http_port=-1, **cfg),  # type: ignore[arg-type]
                           nc=self.bus)  # type: ignore[arg-type]

        self.replays = 0

        async def replay(start: int) -> list[RawBatch] | None:
            self.replays += 1
            if not self.engine.up:
                return None
            return [b for b in self.engine.buffer if b[0] >= start]

        self.agent._replay = replay  # type: ignore[method-assign]

    def restart_engine(self) -> None:
        """A new engine process (seq from 0, other blocks); the ZMQ connection dropped."""
        self.engine = FakeEngine(first_hash=self.engine._next + 1000)
        self.agent._on_disconnect()

    async def idle(self, n: int = 10) -> None:
        """``n`` idle checks, as the KV loop makes them."""
        for _ in range(n):
            await self.agent._catch_up()
            await self.agent._flush()

    def counter(self, name: str) -> float:
        return self.agent.metrics.registry.get_sample_value(name) or 0.0


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    harness = Harness()
    yield harness
    harness.agent._ctx.term()


async def test_an_idle_engine_that_published_nothing_is_cleared_once(h: Harness) -> None:
    await h.idle(20)
    assert [b.engine_seq for b in h.bus.cleared()] == [None]
    assert len(h.bus.batches) == 1
    assert h.counter("infermesh_agent_rebuilds_total") == 1


async def test_a_restart_with_nothing_published_on_either_side_is_one_more_clear(
        h: Harness) -> None:
    await h.idle(5)
    h.restart_engine()
    await h.idle(20)
    assert len(h.bus.cleared()) == 2 and len(h.bus.batches) == 2
    assert h.counter("infermesh_agent_rebuilds_total") == 2
    assert h.counter("infermesh_agent_engine_restarts_total") == 1


async def test_a_cleared_batch_never_carries_the_old_engines_seq(h: Harness) -> None:
    await h.idle(1)
    for _ in range(3):
        h.engine.store(2)
    await h.idle(3)
    assert h.bus.batches[-1].engine_seq == 2 and len(h.agent.blocks) == 6
    h.restart_engine()
    await h.idle(10)
    assert [b.engine_seq for b in h.bus.cleared()] == [None, None]
    assert len(h.agent.blocks) == 0
    # The new engine's first batch names its own seq.
    h.engine.store(1)
    await h.idle(2)
    assert h.bus.batches[-1].engine_seq == 0 and len(h.bus.cleared()) == 2


async def test_a_live_copy_of_a_batch_applied_by_an_idle_check_is_dropped_quietly(
        h: Harness) -> None:
    h.engine.store(1)
    await h.idle(1)
    seq, payload = h.engine.store(2)  # published while the idle check's replay ran
    await h.idle(1)
    n, replays, blocks = len(h.bus.batches), h.replays, len(h.agent.blocks)
    await h.agent._on_frames([b"kv@engine", seq.to_bytes(8, "big"), payload])
    await h.agent._flush()
    assert (len(h.bus.batches), h.replays, len(h.agent.blocks)) == (n, replays, blocks)


async def test_a_restart_without_a_drop_is_seen_by_its_history(h: Harness) -> None:
    h.engine.store(1)
    await h.idle(2)
    h.engine = FakeEngine(first_hash=5000)  # same port, the drop went unnoticed
    h.engine.store(1)
    await h.idle(5)
    assert len(h.bus.cleared()) == 2
    assert {e.block_hashes[0] for b in h.bus.batches for e in b.events
            if isinstance(e, BlockStored)} == {1000, 5000}
    assert set(h.agent.blocks.blocks) == {5000}


async def test_a_drop_from_the_same_engine_changes_nothing(h: Harness) -> None:
    h.engine.store(2)
    await h.idle(2)
    n = len(h.bus.batches)
    h.agent._on_disconnect()
    h.engine.up = False
    await h.idle(3)  # replays fail meanwhile
    h.engine.up = True
    await h.idle(3)
    assert len(h.bus.batches) == n and len(h.bus.cleared()) == 1


async def test_a_lost_engine_and_its_successor_make_one_clear() -> None:
    h = Harness(engine_lost_s=0.0)
    try:
        h.engine.store(2)
        await h.idle(2)
        h.agent._scraped(EngineLoad(ready=True, model="m"))
        # Killed: the API server's port refuses, but (as vLLM's engine core does for a few
        # seconds) the replay socket still answers with the dead engine's blocks.
        refused = aiohttp.ClientConnectorError(
            SimpleNamespace(ssl=None, host="127.0.0.1", port=1),  # type: ignore[arg-type]
            ConnectionRefusedError(111, "Connection refused"))
        for _ in range(3):
            await h.agent._scrape_failed(refused)
        assert not h.agent.load.ready
        assert len(h.bus.cleared()) == 2 and h.bus.cleared()[-1].engine_seq is None
        assert h.counter("infermesh_agent_engine_lost_total") == 1
        n = len(h.bus.batches)
        await h.idle(5)
        assert len(h.bus.batches) == n and len(h.agent.blocks) == 0  # not rebuilt from it
        h.restart_engine()
        await h.idle(3)  # its HTTP does not answer yet
        h.agent._scraped(EngineLoad(ready=True, model="m"))
        await h.idle(10)
        assert len(h.bus.cleared()) == 2  # the successor needs no second one
        assert h.counter("infermesh_agent_rebuilds_total") == 2
        assert h.counter("infermesh_agent_engine_restarts_total") == 1
        h.engine.store(1)
        await h.idle(1)
        assert set(h.agent.blocks.blocks) == {h.engine._next - 1}
    finally:
        h.agent._ctx.term()


async def test_a_timed_out_scrape_keeps_the_load_until_the_grace_is_over() -> None:
    h = Harness(engine_unresponsive_s=5.0)
    try:
        a = h.agent
        a._scraped(EngineLoad(ready=True, model="m", running=4))
        for e in (TimeoutError(), aiohttp.ServerDisconnectedError()):
            await a._scrape_failed(e)
            assert a.load.ready and a.load.running == 4
        assert a._answered_at is not None
        a._answered_at -= 5.1  # the engine has not answered for longer than the grace
        await a._scrape_failed(TimeoutError())
        assert not a.load.ready and a.load.running == 4
        a._scraped(EngineLoad(ready=True, model="m"))
        assert a.load.ready
        # An answer that is an error is no slow engine: not ready at once.
        await a._scrape_failed(aiohttp.ClientResponseError(
            SimpleNamespace(real_url="x"), (), status=500))  # type: ignore[arg-type]
        assert not a.load.ready
    finally:
        h.agent._ctx.term()
