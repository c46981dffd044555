"""The vLLM worker agent: one per engine, the engine's adapter to the bus.

It turns the engine's ZMQ KV events into the project's KVEventBatch stream on
``im.kv.<pool>.<pod>`` (own gapless seq within an epoch), keeps the engine's block set so it can
answer ``im.snapshot.<pod>``, and publishes a PodState heartbeat from the engine's /metrics.

Engine stream rules:

* batches apply in engine-seq order; a gap is filled from the replay socket;
* a seq lower than expected means the engine restarted: the pod's blocks are replaced (an
  AllBlocksCleared goes out first), then rebuilt from the new engine's replay buffer;
* after the ZMQ connection drops and comes back, or when the agent starts, the state is rebuilt
  from the engine's replay buffer when it still reaches back to seq 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from typing import Any

import aiohttp
import msgspec
import zmq
import zmq.asyncio
from nats.aio.client import Client
from nats.micro.request import Request
from prometheus_client import CollectorRegistry, Counter, Gauge

from infermesh.libs.bus import BUS_REGISTRY, BusService, cancel_tasks, connect, release
from infermesh.libs.telemetry import get_logger
from infermesh.libs.telemetry.ops import OpsServer
from infermesh.proto import codec
from infermesh.proto.messages import (
    AllBlocksCleared,
    AnyKVEvent,
    KVEventBatch,
    LoraInfo,
    PodState,
    Snapshot,
    SnapshotRequest,
)
from infermesh.proto.subjects import Subjects
from infermesh.proto.vllm_kv import KVEventDecodeError, VllmEventDecoder

from .blockset import BlockSet
from .config import AgentConfig
from .kvstream import KVSubscriber, RawBatch, ReplayError, replay
from .scrape import EngineLoad, scrape_engine
from .vllm_launcher import VllmPorts, VllmProcess

log = get_logger("agent")


class AgentMetrics:
    """The agent's own counters (served on its /metrics)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.engine_batches = Counter(
            "infermesh_agent_engine_batches", "Engine batches applied", registry=r
        )
        self.engine_events = Counter(
            "infermesh_agent_engine_events", "Engine events applied", registry=r
        )
        self.bad_frames = Counter(
            "infermesh_agent_bad_frames", "ZMQ messages with bad framing", registry=r
        )
        self.bad_payloads = Counter(
            "infermesh_agent_bad_payloads", "Engine payloads that did not decode", registry=r
        )
        self.gaps = Counter("infermesh_agent_seq_gaps", "Engine seq gaps seen", registry=r)
        self.lost_batches = Counter(
            "infermesh_agent_lost_batches",
            "Engine batches neither received nor replayed",
            registry=r,
        )
        self.replays = Counter(
            "infermesh_agent_replays", "Replay requests made", ["outcome"], registry=r
        )
        self.engine_restarts = Counter(
            "infermesh_agent_engine_restarts", "Engine restarts detected", registry=r
        )
        self.rebuilds = Counter(
            "infermesh_agent_rebuilds", "Full rebuilds of the block set", registry=r
        )
        self.bus_batches = Counter(
            "infermesh_agent_bus_batches", "KVEventBatch messages published", registry=r
        )
        self.bus_events = Counter(
            "infermesh_agent_bus_events", "Events published on the bus", registry=r
        )
        self.snapshots = Counter(
            "infermesh_agent_snapshots", "Snapshot requests answered", ["outcome"], registry=r
        )
        self.scrape_errors = Counter(
            "infermesh_agent_scrape_errors", "Failed /metrics scrapes", registry=r
        )
        self.engine_lost = Counter(
            "infermesh_agent_engine_lost",
            "Times the engine's port refused connections for engine_lost_s (cache dropped)",
            registry=r,
        )
        self.blocks = Gauge(
            "infermesh_agent_blocks", "Blocks the engine holds (any tier)", registry=r
        )


class Agent:
    """One engine's agent. ``await start()``, then ``await stop()``."""

    def __init__(self, cfg: AgentConfig, nc: Client | None = None) -> None:
        self.vllm: VllmProcess | None = None
        if cfg.launch_vllm:
            # The agent owns its engine: its URL and endpoints are what it launches.
            ports = VllmPorts.pick(cfg.vllm_port, cfg.vllm_kv_port, cfg.vllm_replay_port)
            self.vllm = VllmProcess(
                cfg.vllm_command, cfg.launch_vllm, cfg.model or cfg.launch_vllm, ports,
                cfg.vllm_args, log_path=cfg.vllm_log or None,
            )
            cfg = dataclasses.replace(
                cfg, engine_url=self.vllm.url, kv_endpoint=self.vllm.kv_endpoint,
                replay_endpoint=self.vllm.replay_endpoint,
                model=cfg.model or cfg.launch_vllm,
            )
        self.cfg = cfg
        self.pod = cfg.pod_name()
        self.subjects = Subjects(cfg.subject_prefix)
        self.epoch = secrets.token_hex(6)
        self.seq = 0  # last bus seq published
        self.blocks = BlockSet()
        self.metrics = AgentMetrics()
        self.load = EngineLoad()
        self.model = cfg.model
        self._nc = nc
        self._own_nc = nc is None
        self._ctx = zmq.asyncio.Context()
        self._decoder = VllmEventDecoder()
        self._expected: int | None = None  # next engine seq
        self._last: tuple[int, int] | None = None  # (seq, payload hash) last applied
        self._seen: dict[int, int] = {}  # seq → payload hash of the last replay
        self._recheck = True  # re-check against the replay buffer at the next batch
        self._synced = asyncio.Event()  # the start-up sync with the engine is over
        self._pending: list[AnyKVEvent] = []
        self._pending_engine_seq: int | None = None
        self._refused_since: float | None = None  # the engine's port refuses connections
        self._engine_lost_told = False  # AllBlocksCleared sent for the lost engine
        self._tasks: list[asyncio.Task[Any]] = []
        self._sub: KVSubscriber | None = None
        self._service: BusService | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ops: OpsServer | None = None
        self.http_port: int | None = None
        self._kv_subject = self.subjects.kv(cfg.pool, self.pod)
        self._started = time.time()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect to the bus and the engine; start the loops and the snapshot endpoint."""
        if self.vllm is not None:
            await self.vllm.start()
        if self._nc is None:
            self._nc = await connect(self.cfg.nats_url, f"agent-{self.pod}",
                                     security=self.cfg.bus_security())
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.scrape_timeout_s)
        )
        self._sub = KVSubscriber(
            self._ctx, self.cfg.kv_endpoint, self.cfg.kv_topic, self._on_reconnect
        )
        svc = BusService(
            self._nc,
            "infermesh-agent",
            description=f"vLLM agent of {self.pod}",
            registry=self.metrics.registry,
            metadata={"pod": self.pod},
        )
        svc.raw_endpoint("snapshot", self.subjects.kv_snapshot(self.pod), self._on_snapshot)
        await svc.start()
        self._service = svc
        if self.cfg.http_port >= 0:
            self._ops = OpsServer([self.metrics.registry, BUS_REGISTRY], self._health)
            self.http_port = await self._ops.start(self.cfg.http_host, self.cfg.http_port)
        self._tasks = [
            asyncio.create_task(self._kv_loop(), name="agent-kv"),
            asyncio.create_task(self._scrape_loop(), name="agent-scrape"),
            asyncio.create_task(self._heartbeat_loop(), name="agent-heartbeat"),
        ]
        log.info(
            "agent_started",
            pod=self.pod,
            pool=self.cfg.pool,
            epoch=self.epoch,
            engine=self.cfg.engine_url,
            kv=self.cfg.kv_endpoint,
            http_port=self.http_port,
        )

    async def stop(self) -> None:
        """Stop everything this agent started (its engine too, when it launched one)."""
        if self.vllm is not None:
            await self.vllm.stop()
        await cancel_tasks(self._tasks)
        self._tasks = []
        await release(service=self._service)
        if self._sub is not None:
            await self._sub.close()
        if self._http is not None:
            await self._http.close()
        await release(ops=self._ops, nc=self._nc if self._own_nc else None)
        self._ctx.term()

    def _health(self) -> tuple[bool, dict[str, Any]]:
        ok = self._nc is not None and self._nc.is_connected
        return ok, {"pod": self.pod, "epoch": self.epoch, "seq": self.seq,
                    "blocks": len(self.blocks), "engine_ready": self.load.ready}

    # ------------------------------------------------------------------ KV events

    def _on_reconnect(self) -> None:
        self._recheck = True

    async def _kv_loop(self) -> None:
        assert self._sub is not None
        sock = self._sub.sock
        # Start from the engine's replay buffer, so blocks stored before this agent started
        # (or while it was away) are known without waiting for new traffic.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._sub.connected.wait(), self.cfg.replay_timeout_s)
        # Batches name the model (consumers seed block keys with it): learn it first if we can.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.replay_timeout_s
        while not (self.model or self.load.model) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        try:
            if await self._sync():
                self._recheck = False
                await self._flush()
        finally:
            self._synced.set()
        idle_ms = int(self.cfg.idle_check_s * 1000)
        while True:
            try:
                if not await sock.poll(idle_ms):
                    # Quiet engine: make sure nothing was missed (a PUB drops messages while a
                    # SUB is still connecting), and re-check identity after a reconnect.
                    await self._catch_up()
                    await self._flush()
                    continue
                frames = await sock.recv_multipart()
                await self._on_frames(frames)
                # Coalesce whatever else is already queued into the same bus message.
                while len(self._pending) < self.cfg.max_batch_events and await sock.poll(0):
                    await self._on_frames(await sock.recv_multipart())
                await self._flush()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the stream
                log.exception("kv_loop_error")
                await asyncio.sleep(0.05)

    async def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.metrics.bad_frames.inc()
            return
        seq = int.from_bytes(frames[1], "big")
        payload = frames[2]
        if self._recheck or self._expected is None:
            # After a reconnect the engine may be a new process: re-check against replay.
            self._recheck = False
            await self._sync()
        exp = self._expected
        if exp is None or seq == exp:
            self._apply(seq, payload)
            return
        if seq < exp and self._seen.get(seq) == hash(payload):
            return  # already applied through a replay
        if seq > exp:
            self.metrics.gaps.inc()
        else:
            log.warning("engine_restart_suspected", seq=seq, expected=exp)
        await self._sync()
        exp = self._expected
        if exp is None or seq == exp:
            self._apply(seq, payload)
        elif seq > exp:
            # The replay buffer no longer holds the missing batches.
            self.metrics.lost_batches.inc(seq - exp)
            log.warning("engine_batches_lost", expected=exp, got=seq)
            self._apply(seq, payload)

    def _apply(self, seq: int, payload: bytes) -> None:
        self._expected = seq + 1
        self._pending_engine_seq = seq
        self._last = (seq, hash(payload))
        try:
            batch = self._decoder.decode(payload)
        except KVEventDecodeError as e:
            self.metrics.bad_payloads.inc()
            log.warning("engine_payload_invalid", seq=seq, error=str(e)[:200])
            return
        for ev in batch.events:
            self.blocks.apply(ev)
        self._pending.extend(batch.events)
        self.metrics.engine_batches.inc()
        self.metrics.engine_events.inc(len(batch.events))

    async def _replay(self, start: int) -> list[RawBatch] | None:
        if not self.cfg.replay_endpoint:
            return None
        try:
            got = await replay(
                self._ctx, self.cfg.replay_endpoint, start, self.cfg.replay_timeout_s
            )
        except ReplayError as e:
            self.metrics.replays.labels("failed").inc()
            log.warning("replay_failed", start=start, error=str(e))
            return None
        self.metrics.replays.labels("ok").inc()
        return got

    async def _catch_up(self) -> None:
        """Apply batches the engine published after the last one seen, if any."""
        if self._recheck or self._last is None:
            self._recheck = False
            await self._sync()
            return
        last_seq, last_hash = self._last
        got = await self._replay(last_seq)
        if got is None:
            return
        if not got or got[0][0] != last_seq or hash(got[0][1]) != last_hash:
            await self._sync()  # our last batch is not in the buffer: a new engine or a gap
            return
        for seq, payload in got[1:]:
            if seq == self._expected:
                self._apply(seq, payload)

    async def _sync(self) -> bool:
        """Bring the block set in line with the engine's replay buffer; False if unreachable.

        If the buffer still holds the last batch this agent applied (same seq, same bytes), the
        engine is the same process: only the batches after it are applied. Otherwise the engine
        is new (or this agent is): the block set is replaced by what the buffer rebuilds, and
        consumers are told with an AllBlocksCleared first.
        """
        got = await self._replay(0)
        if got is None:
            return False
        self._seen = {s: hash(p) for s, p in got}
        last = self._last
        if last is not None and self._seen.get(last[0]) == last[1]:
            for s, p in got:
                if s > last[0] and s == self._expected:
                    self._apply(s, p)
            return True
        if last is not None:
            self.metrics.engine_restarts.inc()
            log.warning("engine_restart_detected", last_seq=last[0])
        self.metrics.rebuilds.inc()
        self.blocks.clear()
        self._pending.append(AllBlocksCleared())
        self._expected = got[0][0] if got else 0
        if got and got[0][0] != 0:
            self.metrics.lost_batches.inc(got[0][0])
            log.warning("history_truncated", first_replayed=got[0][0])
        for s, p in got:
            if s == self._expected:
                self._apply(s, p)
        return True

    async def _flush(self) -> None:
        if not self._pending:
            return
        events, self._pending = self._pending, []
        await self._publish_events(events)
        self.metrics.blocks.set(len(self.blocks))

    async def _publish_events(self, events: list[AnyKVEvent]) -> None:
        """Publish ``events`` as one batch, or as several when one would exceed max_payload."""
        assert self._nc is not None
        batch = KVEventBatch(
            pod=self.pod,
            pool=self.cfg.pool,
            epoch=self.epoch,
            seq=self.seq + 1,
            ts=time.time(),
            events=events,
            engine_seq=self._pending_engine_seq,
            model=self.model or self.load.model,
        )
        data = codec.encode(batch)
        limit = self._nc.max_payload or (1 << 20)
        if len(data) > limit - 1024 and len(events) > 1:
            half = len(events) // 2
            await self._publish_events(events[:half])
            await self._publish_events(events[half:])
            return
        self.seq += 1
        await self._nc.publish(self._kv_subject, data)
        self.metrics.bus_batches.inc()
        self.metrics.bus_events.inc(len(events))

    # ------------------------------------------------------------------ snapshots

    async def _on_snapshot(self, req: Request) -> None:
        try:
            ask = codec.decode(req.data, SnapshotRequest)
        except codec.DecodeError as e:
            self.metrics.snapshots.labels("bad_request").inc()
            await req.respond_error("400", str(e))
            return
        if ask.pod != self.pod:
            self.metrics.snapshots.labels("bad_request").inc()
            await req.respond_error("404", f"this agent serves pod {self.pod!r}, not {ask.pod!r}")
            return
        # Answer from the engine's full history, not from a half-started agent.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._synced.wait(), 2 * self.cfg.replay_timeout_s + 1)
        # Built in one go (no await) so it is consistent with self.seq.
        await self._flush()
        blocks = self.blocks.snapshot_blocks()
        size = max(1, min(ask.max_blocks_per_part, self.cfg.snapshot_part_blocks))
        parts = max(1, -(-len(blocks) // size))
        seq = self.seq
        msgs = [
            codec.encode(
                Snapshot(
                    pod=self.pod,
                    pool=self.cfg.pool,
                    epoch=self.epoch,
                    seq=seq,
                    block_size=self.blocks.block_size or self.load.block_size,
                    model=self.model or self.load.model,
                    part=i,
                    parts=parts,
                    blocks=blocks[i * size : (i + 1) * size],
                )
            )
            for i in range(parts)
        ]
        for m in msgs:
            await req.respond(m)
        self.metrics.snapshots.labels("ok").inc()

    # ------------------------------------------------------------------ load and heartbeat

    async def _scrape_loop(self) -> None:
        assert self._http is not None
        while True:
            try:
                self.load = await scrape_engine(
                    self._http, self.cfg.engine_url, self.model, self.load
                )
                self._engine_lost_told = False
                if not self.model and self.load.model:
                    self.model = self.load.model
            except asyncio.CancelledError:
                raise
                self._refused_since = None
            except Exception as e:
                self.metrics.scrape_errors.inc()
                self.load = msgspec.structs.replace(self.load, ready=False)
                log.debug("scrape_failed", error=repr(e))
                if isinstance(e, aiohttp.ClientConnectorError):
                    await self._engine_refused()
            await asyncio.sleep(self.cfg.heartbeat_s)

    async def _engine_refused(self) -> None:
        """The engine's port refuses connections: after ``engine_lost_s`` its cache is gone.

        A refused connection means no process listens any more (a slow or paused engine
        times out instead), and a dead engine's KV cache died with it: the block set is
        emptied and consumers are told with an AllBlocksCleared, once. When an engine comes
        back on the port, the replay check sees a new process and rebuilds from it.
        """
        now = time.monotonic()
        if self._refused_since is None:
            self._refused_since = now
            return
        if now - self._refused_since < self.cfg.engine_lost_s or self._engine_lost_told:
            return
        self._engine_lost_told = True
        # Whatever answers on the port next is rebuilt in full from its replay buffer.
        self._last = None
        self._expected = None
        self._recheck = True
        if not self.blocks:
            return  # nothing to withdraw (e.g. an engine that is still starting)
        self.metrics.engine_lost.inc()
        log.warning("engine_lost", pod=self.pod, blocks=len(self.blocks))
        self.blocks.clear()
        self._pending.append(AllBlocksCleared())
        await self._flush()

    def pod_state(self) -> PodState:
        """The heartbeat as of now."""
        ld = self.load
        return PodState(
            pod=self.pod,
            pool=self.cfg.pool,
            model=self.model or ld.model,
            url=self.cfg.engine_url,
            ts=time.time(),
            epoch=self.epoch,
            kv_seq=self.seq,
            ready=ld.ready,
            running=ld.running,
            waiting=ld.waiting,
            kv_usage=ld.kv_usage,
            block_size=ld.block_size or self.blocks.block_size,
            num_gpu_blocks=ld.num_gpu_blocks,
            num_cpu_blocks=ld.num_cpu_blocks,
            lora=LoraInfo(running=ld.lora_running, waiting=ld.lora_waiting, max_lora=ld.max_lora),
            role=self.cfg.role,
            labels=self.cfg.labels,
            prefix_cache_queries=ld.prefix_queries,
            prefix_cache_hits=ld.prefix_hits,
            max_model_len=ld.max_model_len,
            adapters=ld.adapters,
        )

    async def _heartbeat_loop(self) -> None:
        assert self._nc is not None
        subject = self.subjects.pod_state(self.cfg.pool, self.pod)
        while True:
            try:
                await self._nc.publish(subject, codec.encode(self.pod_state()))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the bus may be away; nats-py buffers and reconnects
                log.debug("heartbeat_failed", error=repr(e))
            await asyncio.sleep(self.cfg.heartbeat_s)
