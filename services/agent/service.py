"""The vLLM worker agent: one per engine, the engine's adapter to the bus.

It turns the engine's ZMQ KV events into the project's KVEventBatch stream on
``im.kv.<pool>.<pod>`` (own gapless seq within an epoch), keeps the engine's block set so it can
answer ``im.snapshot.<pod>``, and publishes a PodState heartbeat from the engine's /metrics.

Engine stream rules:

* batches apply in engine-seq order; a gap is filled from the replay socket;
* a seq lower than expected means the engine restarted: the pod's blocks are replaced (an
  AllBlocksCleared goes out first), then rebuilt from the new engine's replay buffer;
* when the agent starts, and after the engine may have been replaced (the ZMQ connection or its
  HTTP port went away), the replay buffer decides: if it still holds the last batch applied, the
  engine is the same process; otherwise (or when neither engine published anything, so nothing
  can prove it) the state is rebuilt from it;
* an engine whose HTTP port refuses after it answered is dead: its blocks are withdrawn (one
  AllBlocksCleared, after ``engine_lost_s``) and its ZMQ side is ignored until an engine answers
  HTTP again (vLLM's engine core outlives a killed API server for seconds);
* one engine process gives one AllBlocksCleared: a quiet engine with an empty replay buffer is
  re-checked every idle period but not rebuilt again, the engine that follows a withdrawn one
  needs no second clear, and a cleared batch carries no engine seq of the engine before it.

Load and readiness come from scraping /metrics every ``heartbeat_s``; the heartbeat never waits
on a scrape. A scrape that times out (a busy engine) keeps the last load for
``engine_unresponsive_s``; a refused one means the engine is gone.

Until the engine has answered once (a launched vLLM takes 20-50 s to boot) failed replays and
scrapes are expected, and logged at debug: the agent says once that it waits (and where a
launched engine's output goes), and once that the engine is ready.
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

from infermesh.libs.bus import BUS_REGISTRY, BusService, cancel_tasks, connect, release
from infermesh.libs.telemetry import get_logger
from infermesh.libs.telemetry.ops import OpsServer
from infermesh.proto import codec
from infermesh.proto.messages import (
    AllBlocksCleared,
    AnyKVEvent,
    BlockStored,
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
from .metrics import AgentMetrics
from .scrape import EngineLoad, adapters_in, scrape_engine
from .vllm_launcher import LoraSettings, StorageTier, VllmPorts, VllmProcess

log = get_logger("agent")


def split_stored(ev: AnyKVEvent) -> tuple[BlockStored, BlockStored] | None:
    """A BlockStored of several blocks as two, the second chained to the first (None when it
    cannot be split: another event, or one block)."""
    if not isinstance(ev, BlockStored) or len(ev.block_hashes) < 2:
        return None
    n = len(ev.block_hashes)
    if len(ev.token_ids) % n:
        return None  # tokens that do not map onto whole blocks: consumers key by them
    half = n // 2
    cut = half * (len(ev.token_ids) // n)
    first = msgspec.structs.replace(ev, block_hashes=ev.block_hashes[:half],
                                    token_ids=ev.token_ids[:cut])
    second = msgspec.structs.replace(ev, block_hashes=ev.block_hashes[half:],
                                     token_ids=ev.token_ids[cut:],
                                     parent_hash=ev.block_hashes[half - 1])
    return first, second


class AgentService:
    """One engine's agent. ``await start()``, then ``await stop()``."""

    def __init__(self, cfg: AgentConfig, nc: Client | None = None) -> None:
        self.vllm: VllmProcess | None = None
        if cfg.launch_vllm:
            # The agent owns its engine: its URL and endpoints are what it launches.
            ports = VllmPorts.pick(
                cfg.vllm_port, cfg.vllm_kv_port, cfg.vllm_replay_port,
                nixl=None if cfg.role == "both" else cfg.vllm_nixl_port,
            )
            storage = StorageTier(
                cfg.vllm_storage_dir, capacity_bytes=cfg.vllm_storage_capacity_bytes,
                cpu_bytes=cfg.vllm_offload_cpu_bytes, locality=cfg.vllm_storage_locality,
            ) if cfg.vllm_storage_dir else None
            pod = dataclasses.replace(cfg, engine_url=f"http://127.0.0.1:{ports.http}").pod_name()
            self.vllm = VllmProcess(
                cfg.vllm_command, cfg.launch_vllm, cfg.model or cfg.launch_vllm, ports,
                cfg.vllm_args, log_path=cfg.vllm_log or None, role=cfg.role,
                nixl_host=cfg.vllm_nixl_host, kv_lease_s=cfg.vllm_kv_lease_s,
                nixl_progress_thread=cfg.vllm_nixl_progress_thread,
                storage=storage, engine_id=f"infermesh-{pod}", hash_seed=cfg.vllm_hash_seed,
                lora=LoraSettings(
                    modules=tuple((n, p) for n, _, p in
                                  (m.partition("=") for m in cfg.vllm_loras)),
                    max_loras=cfg.vllm_max_loras, max_lora_rank=cfg.vllm_max_lora_rank,
                    lora_dir=cfg.lora_dir, runtime_updating=cfg.vllm_lora_runtime_updating,
                ) if cfg.vllm_lora() else None,
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
        self._on_demand: list[str] = []  # adapters in the engine's LoRA directory
        self.model = cfg.model
        self._nc = nc
        self._own_nc = nc is None
        self._ctx = zmq.asyncio.Context()
        self._decoder = VllmEventDecoder()
        self._expected: int | None = None  # next engine seq
        self._last: tuple[int, int] | None = None  # (seq, payload hash) last applied
        self._seen: dict[int, int] = {}  # seq → payload hash of the last replay
        # The engine may have been replaced (start, ZMQ drop, refused port): the next sync
        # rebuilds unless the replay buffer proves it is the same process.
        self._recheck = True
        self._engine_known = False  # some engine was synced before: a rebuild is a restart
        # An AllBlocksCleared for the dead engine went out and nothing since: the rebuild from
        # the next one needs no second.
        self._lost_cleared = False
        self._synced = asyncio.Event()  # the start-up sync with the engine is over
        self._pending: list[AnyKVEvent] = []
        self._pending_engine_seq: int | None = None
        self._refused_since: float | None = None  # the engine's port refuses connections
        self._engine_lost_told = False  # AllBlocksCleared sent for the lost engine
        self._engine_up = False  # its HTTP answered, and has not refused since
        self._waiting_since: float | None = None  # monotonic time we began to wait for it
        self._answered_at: float | None = None  # monotonic time of the last good scrape
        self._unresponsive_told = False  # engine_unresponsive logged for this stall
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._sub: KVSubscriber | None = None
        self._service: BusService | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ops: OpsServer | None = None
        self.http_port: int | None = None
        self._kv_subject = self.subjects.kv(cfg.pool, self.pod)
        self._started = time.time()
        self.draining = False  # POST /drain: heartbeats say not ready (the pod is leaving)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect to the bus and the engine; start the loops and the snapshot endpoint."""
        self._waiting_since = time.monotonic()
        if self.vllm is not None:
            await self.vllm.start()
        if self._nc is None:
            self._nc = await connect(self.cfg.nats_url, f"agent-{self.pod}",
                                     security=self.cfg.bus_security())
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.scrape_timeout_s)
        )
        self._sub = KVSubscriber(
            self._ctx, self.cfg.kv_endpoint, self.cfg.kv_topic, self._on_disconnect
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
            self._ops = OpsServer([self.metrics.registry, BUS_REGISTRY], self._health,
                                  actions={"drain": self.drain,
                                           "undrain": self.undrain})
            self.http_port = await self._ops.start(self.cfg.http_host, self.cfg.http_port)
        self._tasks = [  # the KV loop first: stop() ends it before the engine
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
        if not self._engine_up:
            self._log_waiting()

    def _log_waiting(self) -> None:
        """Say once what the agent waits for (and where a launched engine's output goes)."""
        if self._stopping:
            return
        extra: dict[str, Any] = {}
        if self.vllm is not None:
            extra["vllm_log"] = self.vllm.log_path or "(discarded: set --vllm-log)"
        log.info("waiting_for_engine", url=self.cfg.engine_url, kv=self.cfg.kv_endpoint,
                 replay=self.cfg.replay_endpoint or None, **extra)

    async def stop(self) -> None:
        """Stop everything this agent started (its engine too, when it launched one)."""
        self._stopping = True
        if self.vllm is not None:
            # The KV side goes first: an engine stopped on purpose is no disconnect to warn
            # about. The heartbeat goes on meanwhile and says ready=False once it is down.
            await cancel_tasks(self._tasks[:1])
            if self._sub is not None:
                await self._sub.close()
                self._sub = None
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
                    "blocks": len(self.blocks), "engine_ready": self.load.ready,
                    "draining": self.draining}

    async def drain(self) -> dict[str, Any]:
        """Take the pod out of routing before it is stopped (an autoscaler's scale-down, a
        Kubernetes preStop hook): from now on its heartbeats say ``ready: false`` with the label
        ``draining``, so ingresses and schedulers send it nothing new, while the requests it has
        finish. The heartbeats keep the engine's running and waiting counts, which say when it
        is idle. ``POST /undrain`` takes it back (a scale-down undone before the pod was
        stopped)."""
        if not self.draining:
            self.draining = True
            log.info("pod_draining", pod=self.pod, running=self.load.running,
                     waiting=self.load.waiting)
            await self._announce()
        return {"pod": self.pod, "draining": True, "running": self.load.running,
                "waiting": self.load.waiting}

    async def _announce(self) -> None:
        """A heartbeat now (a change of readiness must not wait for the next beat)."""
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.publish(self.subjects.pod_state(self.cfg.pool, self.pod),
                                       codec.encode(self.pod_state()))

    async def undrain(self) -> dict[str, Any]:
        """Back into routing after :meth:`drain` (the local actuator does it when the target
        rises again while the pod drains: a warm engine instead of a cold start). Its blocks
        never left the indexes (its heartbeats went on), so routing by prefix resumes as it was."""
        if self.draining:
            self.draining = False
            log.info("pod_undrained", pod=self.pod, running=self.load.running)
            await self._announce()
        return {"pod": self.pod, "draining": False, "running": self.load.running,
                "waiting": self.load.waiting}

    # ------------------------------------------------------------------ KV events

    def _on_disconnect(self) -> None:
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
                await self._flush()
        finally:
            self._synced.set()
        idle_ms = int(self.cfg.idle_check_s * 1000)
        while True:
            try:
                if not await sock.poll(idle_ms):
                    # Quiet engine: make sure nothing was missed (a PUB drops messages while a
                    # SUB is still connecting), and re-check identity after a drop.
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
        if self._engine_dead():
            log.debug("batch_of_a_dead_engine_dropped", seq=seq)
            return
        tried = synced = False
        if self._recheck or self._expected is None:
            # The engine may be a new process: re-check against replay. Tried once: from here
            # on the seqs tell (a batch applied now makes its identity checkable by hash), and
            # a replay socket that is away must not cost a timeout per batch.
            tried, synced = True, await self._sync()
            self._recheck = False
        exp = self._expected
        if exp is not None and seq == exp:
            self._apply(seq, payload)
            return
        if exp is not None and seq < exp and self._seen.get(seq) == hash(payload):
            return  # already applied through a replay
        if exp is not None and seq > exp:
            self.metrics.gaps.inc()
        elif exp is not None:
            log.warning("engine_restart_suspected", seq=seq, expected=exp)
        if not tried:
            synced = await self._sync()
        exp = self._expected
        if not synced and (exp is None or seq < exp):
            # No replay to ask: this is the first batch of an engine this agent has not seen,
            # or the seq went back (a new engine). Its state starts from nothing.
            await self._rebuild([])
            exp = self._expected
        assert exp is not None
        if seq == exp:
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
        self._lost_cleared = False
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
            # Expected while the engine boots or restarts: only worth a warning once it is up.
            (log.warning if self._engine_up else log.debug)(
                "replay_failed", start=start, error=str(e)
            )
            return None
        self.metrics.replays.labels("ok").inc()
        return got

    async def _catch_up(self) -> None:
        """Apply batches the engine published after the last one seen, if any."""
        if self._recheck or self._last is None:
            await self._sync()
            return
        last_seq, last_hash = self._last
        got = await self._replay(last_seq)
        if got is None:
            return
        if not got or got[0][0] != last_seq or hash(got[0][1]) != last_hash:
            await self._sync()  # our last batch is not in the buffer: a new engine or a gap
            return
        # What is applied from here may still arrive live (published while the replay ran):
        # that copy is then known, not taken for a restart.
        self._seen = {s: hash(p) for s, p in got}
        for seq, payload in got[1:]:
            if seq == self._expected:
                self._apply(seq, payload)

    def _engine_dead(self) -> bool:
        """The engine answered HTTP once and its port refuses now: it died.

        Until an engine answers HTTP again, its ZMQ side is not trusted: vLLM's engine core
        outlives a killed API server by seconds, and its replay buffer (the dead engine's
        blocks) must not be rebuilt after they were withdrawn. A new engine's KV events come
        only with requests, which need its HTTP server anyway.
        """
        return self._refused_since is not None

    async def _sync(self) -> bool:
        """Bring the block set in line with the engine's replay buffer; False if unreachable.

        If the buffer still holds the last batch this agent applied (same seq, same bytes), the
        engine is the same process: only the batches after it are applied. If neither side has
        anything yet and no drop made a restart possible since the last sync, nothing changed.
        Otherwise the engine is new (or this agent is): the block set is rebuilt from the buffer.
        """
        if self._engine_dead():
            return False
        got = await self._replay(0)
        if got is None or self._engine_dead():
            return False
        self._seen = {s: hash(p) for s, p in got}
        last, exp = self._last, self._expected
        if exp is not None and last is not None and self._seen.get(last[0]) == last[1]:
            self._recheck = False
            for s, p in got:
                if s > last[0] and s == self._expected:
                    self._apply(s, p)
            return True
        if exp is not None and last is None and not self._recheck and (
            not got or got[0][0] == exp
        ):
            # Still the engine synced last time, which had published nothing then: an idle
            # check must not rebuild (and announce a clear) again and again.
            for s, p in got:
                if s == self._expected:
                    self._apply(s, p)
            return True
        await self._rebuild(got)
        return True

    async def _rebuild(self, got: list[RawBatch]) -> None:
        """Replace the block set by what the engine's replay buffer ``got`` holds.

        Consumers are told with one AllBlocksCleared, in a batch of its own engine's seqs only
        (the old engine's pending events go out first), unless the dead engine's clear already
        went out with nothing after it.
        """
        if self._engine_known:
            self.metrics.engine_restarts.inc()
            log.warning("engine_restart_detected", pod=self.pod,
                        last_seq=self._last[0] if self._last else None)
        self._engine_known = True
        self._recheck = False
        self.metrics.rebuilds.inc()
        await self._flush()
        self.blocks.clear()
        if not self._lost_cleared:
            self._pending.append(AllBlocksCleared())
        self._lost_cleared = False
        self._last = None
        self._expected = got[0][0] if got else 0
        if got and got[0][0] != 0:
            self.metrics.lost_batches.inc(got[0][0])
            log.warning("history_truncated", first_replayed=got[0][0])
        for s, p in got:
            if s == self._expected:
                self._apply(s, p)

    async def _flush(self) -> None:
        if not self._pending:
            return
        # Taken in one go (no await), so a batch names the engine seq of its own events only.
        events, self._pending = self._pending, []
        engine_seq, self._pending_engine_seq = self._pending_engine_seq, None
        await self._publish_events(events, engine_seq)
        self.metrics.blocks.set(len(self.blocks))

    async def _publish_events(self, events: list[AnyKVEvent], engine_seq: int | None) -> None:
        """Publish ``events`` as one batch, or as several when one would exceed max_payload."""
        assert self._nc is not None
        batch = KVEventBatch(
            pod=self.pod,
            pool=self.cfg.pool,
            epoch=self.epoch,
            seq=self.seq + 1,
            ts=time.time(),
            events=events,
            engine_seq=engine_seq,
            model=self.model or self.load.model,
        )
        data = codec.encode(batch)
        limit = self._nc.max_payload or (1 << 20)
        if len(data) > limit - 1024:
            if len(events) > 1:
                half = len(events) // 2
                await self._publish_events(events[:half], engine_seq)
                await self._publish_events(events[half:], engine_seq)
                return
            parts = split_stored(events[0])
            if parts is not None:  # one prompt's blocks (a long one) over the limit
                await self._publish_events(list(parts), engine_seq)
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
        """Scrape the engine's load every ``scrape_interval_s``; heartbeats carry the last one.

        The heartbeat never waits on a scrape, so an engine that is slow to answer delays
        nothing but the freshness of its load figures.
        """
        assert self._http is not None
        while True:
            try:
                load = await scrape_engine(self._http, self.cfg.engine_url, self.model, self.load,
                                           lora=self.cfg.vllm_lora())
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.metrics.scrape_errors.inc()
                log.debug("scrape_failed", error=repr(e))
                await self._scrape_failed(e)
            else:
                self._scraped(load)
            await asyncio.sleep(self.cfg.scrape_interval_s)

    def _scraped(self, load: EngineLoad) -> None:
        now = time.monotonic()
        self.load = load
        self._on_demand = adapters_in(self.cfg.lora_dir)
        self._answered_at = now
        self._refused_since = None
        self._engine_lost_told = False
        if not self.model and load.model:
            self.model = load.model
        if not self._engine_up:
            waited = None if self._waiting_since is None else round(now - self._waiting_since, 1)
            log.info("engine_ready", pod=self.pod, url=self.cfg.engine_url, model=self.model,
                     waited_s=waited)
        elif self._unresponsive_told:
            log.info("engine_responsive", pod=self.pod, url=self.cfg.engine_url)
        self._engine_up = True
        self._waiting_since = None
        self._unresponsive_told = False

    async def _scrape_failed(self, e: Exception) -> None:
        """What a failed scrape says about the engine, by how it failed.

        Refused: nothing listens, the engine is gone (see :meth:`_engine_refused`). Timed out or
        cut off: the engine is busy (a big prompt blocks its event loop) or paused, so its last
        known load stands until it has not answered for ``engine_unresponsive_s``. An HTTP
        error or a page that does not parse: it answered, and not as a ready engine does.
        """
        if isinstance(e, aiohttp.ClientConnectorError):
            self.load = msgspec.structs.replace(self.load, ready=False)
            await self._engine_refused()
            return
        if not isinstance(e, (TimeoutError, aiohttp.ServerDisconnectedError,
                              aiohttp.ClientOSError, aiohttp.ClientPayloadError)):
            self.load = msgspec.structs.replace(self.load, ready=False)
            return
        silent = None if self._answered_at is None else time.monotonic() - self._answered_at
        if silent is not None and silent < self.cfg.engine_unresponsive_s:
            return
        if self.load.ready and self._engine_up and not self._unresponsive_told:
            self._unresponsive_told = True
            log.warning("engine_unresponsive", pod=self.pod, url=self.cfg.engine_url,
                        silent_s=None if silent is None else round(silent, 1),
                        error=repr(e)[:200])
        self.load = msgspec.structs.replace(self.load, ready=False)

    async def _engine_refused(self) -> None:
        """The engine's port refuses connections: after ``engine_lost_s`` its cache is gone.

        A refused connection means no process listens any more (a slow or paused engine
        times out instead), and a dead engine's KV cache died with it: the block set is
        emptied and consumers are told with an AllBlocksCleared, once. When an engine comes
        back on the port, the replay check sees a new process and rebuilds from it (without
        a second AllBlocksCleared when nothing was published since this one).
        """
        now = time.monotonic()
        if self._engine_up:
            # It answered before and refuses now: the process is gone. Whatever answers next
            # must prove by its replay buffer that it is the same one.
            self._engine_up = False
            self._recheck = True
            self._refused_since = now
            self._waiting_since = now
            self._log_waiting()
            return
        if self._refused_since is None:
            return  # not up since the agent started: a booting engine, not a lost one
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
        (log.info if self._stopping else log.warning)(
            "engine_lost", pod=self.pod, blocks=len(self.blocks), stopping=self._stopping
        )
        self.blocks.clear()
        self._pending.append(AllBlocksCleared())
        await self._flush()
        self._lost_cleared = True

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
            ready=ld.ready and not self.draining,
            running=ld.running,
            waiting=ld.waiting,
            kv_usage=ld.kv_usage,
            block_size=ld.block_size or self.blocks.block_size,
            num_gpu_blocks=ld.num_gpu_blocks,
            num_cpu_blocks=ld.num_cpu_blocks,
            lora=LoraInfo(running=ld.lora_running, waiting=ld.lora_waiting, max_lora=ld.max_lora,
                          loaded=ld.adapters),
            role=self.cfg.role,
            labels={**self.cfg.labels, "draining": "true"} if self.draining else self.cfg.labels,
            prefix_cache_queries=ld.prefix_queries,
            prefix_cache_hits=ld.prefix_hits,
            max_model_len=ld.max_model_len,
            # loaded ones, and those the engine loads on demand from its LoRA directory
            adapters=sorted({*ld.adapters, *self._on_demand}) if self._on_demand else ld.adapters,
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
