"""The simulated engine core: admission, prefix cache, latency model, continuous batching.

One asyncio task per engine plays vLLM's step loop. Each iteration admits waiting requests while
there is room (FCFS: the head of the queue blocks the rest, as in vLLM), emits one token for every
running request whose next token is due, caches blocks that generated tokens completed, and
publishes the step's KV events as one batch.

Latency model (seconds of modelled GPU time, multiplied by ``time_scale`` for the wall clock):

* prefill = uncached tokens / prefill_tokens_per_s + cached tokens × cached_token_cost_s
  + CPU-tier blocks × block bytes / cpu_load_bytes_per_s. Prefills run one at a time (FIFO),
  so a burst of long prompts queues up and TTFT grows under load, as on a real GPU;
* a storage-tier hit adds its read (blocks × block bytes / storage_read_bytes_per_s, one read
  at a time per engine) before the request's prefill, without holding the GPU's queue;
* the first token is ready after request_overhead_s and the prefill;
* inter-token latency = itl_s + itl_per_seq_s × running, slower by prefill_itl_penalty while a
  prefill is in progress (decode steps share the GPU with prefill chunks).

With ``storage_dir`` the engine also has vLLM's shared-storage tier (:mod:`.storage`): the
blocks it computes are written to the directory once their prefill is done, and a prefix its
GPU and CPU tiers miss is looked up there (read and verified in a thread before the request is
admitted) and loaded at storage_read_bytes_per_s, then copied to the GPU at
cpu_load_bytes_per_s, as vLLM promotes storage blocks through its CPU primary tier.

With ``kv_connector`` the engine also plays either side of vLLM's NIXL prefill/decode split
(:mod:`.nixl`): a request asking for a remote decode keeps its blocks on a lease when it
finishes (:mod:`.kv_leases`); a request naming a remote prefill reads the prompt's blocks
from that engine instead of computing them. The read is modelled as blocks × block bytes /
kv_transfer_bytes_per_s, one read at a time per engine (one NIC), then one decode step
recomputes the last prompt token and samples the first output token.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
import uuid
import zlib
from collections import defaultdict, deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from infermesh.libs.telemetry import get_logger
from infermesh.proto.vllm_kv import VllmEventEncoder

from .block_hash import (
    BlockHasher,
    block_extra_keys,
    event_extra_keys,
    to_wire,
    to_wire_bytes,
)
from .cache import Allocation, NoSpace, PrefixCache
from .config import SimConfig
from .kv_client import KVTransferClient, PullOutcome
from .kv_leases import LeaseTable
from .lora import LoraRegistry
from .metrics import EngineMetrics
from .nixl import RemotePrefill, producer_params
from .publisher import ZmqKVPublisher
from .storage import PRIMARY_TIER_LABEL, STORAGE_TIER_LABEL, BlockToStore, StorageTier

log = get_logger("sim.engine")


# A request's output queue carries (token id, finish reason or None); a request that ends
# without a token (aborted, never fit) gets (None, reason).
Output = tuple[int | None, str | None]


@dataclass(eq=False)
class SimRequest:
    """One generation request inside the engine."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    lora_name: str | None = None
    cache_salt: str | None = None
    seed: int | None = None
    # the adapter's path and id when the request came (an unload does not change them)
    lora_path: str | None = None
    lora_id: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    out: asyncio.Queue[Output] = field(default_factory=asyncio.Queue)
    # filled in by the engine
    arrival: float = 0.0
    scheduled_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    next_at: float = 0.0
    cached_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    alloc: Allocation | None = None
    hashes: list[bytes] = field(default_factory=list)
    rng: random.Random | None = None
    finished: bool = False
    modelled_ttft: float = 0.0
    # prefill/decode disaggregation (kv_connector)
    remote_decode: bool = False  # a prefill for a remote decode: hold the blocks when done
    remote_prefill: RemotePrefill | None = None  # a decode: read the prompt's KV from there
    kv_params: dict[str, Any] | None = None  # the prefill's answer (kv_transfer_params)
    external_tokens: int = 0  # prompt tokens read from the remote prefill
    kv_read: bool = False  # the remote read was made (the prefill engine released them)
    xfer_start: float = 0.0
    # the storage tier: the blocks read and verified before admission (None: not looked up)
    storage_verified: frozenset[bytes] | None = None
    storage_probe: asyncio.Task[None] | None = None
    storage_tokens: int = 0  # prompt tokens loaded from storage


class SimEngine:
    """One simulated vLLM engine."""

    def __init__(
        self,
        cfg: SimConfig,
        index: int,
        model_name: str,
        vocab: list[int],
        eos_token_id: int | None,
        metrics: EngineMetrics,
        publisher: ZmqKVPublisher | None,
        kv_address: tuple[str, int] | None = None,
        kv_client: KVTransferClient | None = None,
        model_path: str = "",
    ) -> None:
        self.cfg = cfg
        self.index = index
        self.model_name = model_name
        self.metrics = metrics
        self.publisher = publisher
        self._vocab = vocab  # ids the engine samples output from
        self.eos_token_id = eos_token_id
        self.hasher = BlockHasher(cfg.hash_algo, cfg.hash_seed or _env_seed())
        wire = to_wire if cfg.int_block_hashes else to_wire_bytes
        self.cache = PrefixCache(
            cfg.num_gpu_blocks, cfg.block_size, num_cpu_blocks=cfg.num_cpu_blocks, wire=wire
        )
        self._encoder = VllmEventEncoder(cfg.event_form)
        # This engine's adapters: a runtime load or unload touches this engine only.
        self.lora = LoraRegistry(
            cfg.lora_paths(), max_loras=cfg.max_loras, enabled=cfg.lora_enabled(),
            runtime_updating=cfg.runtime_lora_updating, lora_dir=cfg.lora_dir,
            base_model=model_path)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._prefill_free_at = 0.0
        self._storage_free_at = 0.0  # when the modelled link to the storage tier is free
        self._scale = cfg.time_scale
        self._lora_state: tuple[list[str], list[str]] | None = None
        # prefill/decode disaggregation: who this engine is to its peers, the blocks it
        # holds for remote decodes, and the reads it makes for its own decodes
        self.engine_id = str(uuid.uuid4())
        self.kv_address = kv_address
        self.kv_client = kv_client
        self.leases = LeaseTable(cfg.kv_lease_s, self._release_lease, self._lease_expired)
        self.fetching: dict[SimRequest, asyncio.Task[None]] = {}
        self._link_free_at = 0.0
        self._next_block_id = 0
        self._hb_wake = asyncio.Event()
        self._hb_task: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()
        self.storage: StorageTier | None = None
        if cfg.storage_dir:
            self.storage = StorageTier(
                root=cfg.storage_dir,
                namespace=StorageTier.namespace(
                    model=model_name, block_size=cfg.block_size,
                    none_hash=self.hasher.none_hash, kv_bytes_per_token=cfg.kv_bytes_per_token,
                    file_bytes=cfg.storage_file_bytes),
                capacity_bytes=cfg.storage_capacity_bytes,
                block_bytes=cfg.block_size * cfg.kv_bytes_per_token,
                file_bytes=cfg.storage_file_bytes,
                read_bytes_per_s=cfg.storage_read_bytes_per_s,
                write_bytes_per_s=cfg.storage_write_bytes_per_s,
                max_write_backlog_s=cfg.storage_max_write_backlog_s,
                time_scale=cfg.time_scale, locality=cfg.storage_locality or None,
                self_describing=cfg.storage_self_describing_events,
                block_size=cfg.block_size, metrics=metrics, wire=wire, wake=self._wake.set)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the step loop."""
        if self.publisher is not None:
            self.publisher.start()
        self._task = asyncio.create_task(self._run(), name=f"sim-engine-{self.index}")
        if self.storage is not None:
            self.storage.start()
        if self.cfg.kv_connector and self.kv_client is not None:
            self._hb_task = asyncio.create_task(self._heartbeats(),
                                                name=f"sim-kv-heartbeats-{self.index}")

    async def stop(self) -> None:
        """Stop the loop, abort what runs, close the publisher."""
        for task in (self._task, self._hb_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._hb_task = None
        for r in list(self.running) + list(self.waiting) + list(self.fetching):
            self._finish(r, "abort")
        self.leases.release_all()
        for t in list(self._side_tasks):
            t.cancel()
        if self.storage is not None:
            await self.storage.stop()
        if self.publisher is not None:
            await self.publisher.close()

    # ------------------------------------------------------------------ requests

    def submit(self, req: SimRequest) -> None:
        """Queue a request; ``(token, finish_reason)`` pairs arrive on ``req.out``."""
        if req.lora_name is not None and req.lora_path is None:
            path = self.lora.path(req.lora_name)
            if path is None:
                raise ValueError(f"unknown LoRA adapter {req.lora_name!r}")
            req.lora_path, req.lora_id = path, self.lora.ids[req.lora_name]
        req.arrival = time.monotonic()
        seed = (
            req.seed if req.seed is not None
            else zlib.crc32(f"{self.cfg.seed}:{req.request_id}".encode())
        )
        req.rng = random.Random(seed)
        if not req.hashes:
            req.hashes = self.prompt_hashes(req)
        self.waiting.append(req)
        if req.remote_prefill is not None:
            self._hb_wake.set()
        self._wake.set()

    def prompt_hashes(self, req: SimRequest) -> list[bytes]:
        """The chained hashes of the prompt's full blocks (no engine state: thread-safe).

        :meth:`submit` computes them unless the caller did, e.g. in a worker thread for a
        long prompt.
        """
        lora_path = req.lora_path
        if req.lora_name and lora_path is None:
            lora_path = self.lora.path(req.lora_name)
        return self.hasher.hash_prompt(
            req.prompt_ids, self.cfg.block_size, lora_name=req.lora_name,
            lora_path=lora_path, cache_salt=req.cache_salt,
        )

    def abort(self, req: SimRequest) -> None:
        """The client went away: free the request's blocks now."""
        if not req.finished:
            with contextlib.suppress(ValueError):
                self.waiting.remove(req)
            self._finish(req, "abort")

    def finish_stop(self, req: SimRequest) -> None:
        """A stop string matched (detokenizing is the server's job): end it as "stop"."""
        if not req.finished:
            with contextlib.suppress(ValueError):
                self.waiting.remove(req)
            self._finish(req, "stop", notify=False)

    def reset_prefix_cache(self) -> bool:
        """``POST /reset_prefix_cache``; False while requests hold blocks (as vLLM)."""
        ok = self.cache.reset()
        self._wake.set()
        return ok

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None
        while True:
            try:
                self._wake.clear()  # first: a wake set during this iteration is not lost
                now = time.monotonic()
                self._admit(now)
                if self.running:
                    self._step(now)
                await self._publish_events()
                self._update_gauges()
                if self.running:
                    delay = min(r.next_at for r in self.running) - time.monotonic()
                    if delay <= 0:
                        await asyncio.sleep(0)
                        continue
                    handle = loop.call_later(delay, self._wake.set)
                await self._wake.wait()
                if handle is not None:
                    handle.cancel()
                    handle = None
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad step kill the engine
                log.exception("engine_step_failed", engine=self.index)
                await asyncio.sleep(0.01)

    def _admit(self, now: float) -> None:
        cfg = self.cfg
        while self.waiting and len(self.running) < cfg.max_num_seqs:
            req = self._next_admissible()
            if req is None:
                return  # every waiting request's adapter needs a slot that running ones hold
            n = len(req.prompt_ids)
            if self.storage is not None and req.remote_prefill is None:
                if not self._storage_ready(req):
                    return  # FCFS: the head waits for its storage lookup
            try:
                alloc, gpu_hit, cpu_hit = self.cache.allocate(
                    req.hashes, req.prompt_ids, n, req.max_tokens,
                    lora_name=req.lora_name, lora_id=req.lora_id,
                    extra=partial(self._event_extra, req),
                    delay_cache=req.remote_prefill is not None,
                )
            except NoSpace:
                if not self.running:
                    # Nothing will free space: the request can never fit.
                    self.waiting.remove(req)
                    self._finish(req, "abort")
                    continue
                return
            self.waiting.remove(req)
            req.alloc = alloc
            bs = cfg.block_size
            cached = gpu_hit * bs
            loaded = cpu_hit * bs
            disk_blocks = 0
            if self.storage is not None:
                disk_blocks = self._storage_hits(req, gpu_hit, cpu_hit)
                req.storage_tokens = disk_blocks * bs
            req.cached_tokens = cached + loaded + req.storage_tokens
            if cfg.num_cpu_blocks or self.storage is not None:
                # vLLM's offloading connector: GPU hits are local, the tiers' are external
                self.metrics.on_offload_query(n, cached, host_tokens=loaded,
                                              disk_tokens=req.storage_tokens)
            else:
                self.metrics.on_prefix_query(n, req.cached_tokens)
            if cfg.kv_connector:
                # vLLM asks the connector about every token past the local hit.
                external = n - req.cached_tokens if req.remote_prefill is not None else 0
                self.metrics.on_connector_query(n - req.cached_tokens, external)
                if req.remote_prefill is not None:
                    self._start_read(req, now, gpu_hit + cpu_hit)
                    continue
            disk_s = 0.0
            if self.storage is not None and disk_blocks:
                disk_s = self.storage.load_seconds(disk_blocks)
                self.metrics.on_storage_read(STORAGE_TIER_LABEL,
                                             disk_blocks * bs * cfg.kv_bytes_per_token, disk_s)
            # An adapter not in a slot is loaded first (vLLM's LoRA swap, before the prefill).
            swap_s = cfg.lora_load_s if req.lora_name and self.lora.activate(
                req.lora_name, self._busy_adapters()) else 0.0
            compute = (
                swap_s
                + (n - req.cached_tokens) / cfg.prefill_tokens_per_s
                + req.cached_tokens * cfg.cached_token_cost_s
                # storage blocks are promoted through the CPU tier, then copied like its own
                + (loaded + req.storage_tokens) * cfg.kv_bytes_per_token / cfg.cpu_load_bytes_per_s
            )
            ready = now + cfg.request_overhead_s * self._scale
            start = max(ready, self._prefill_free_at)
            done = start + compute * self._scale
            self._prefill_free_at = done
            if disk_s:
                # The read runs on the storage link, not the GPU (vLLM schedules other
                # requests while one waits for its KV): the GPU's queue keeps only this
                # request's compute, and its first token waits for the read as well.
                load_done = max(ready, self._storage_free_at) + disk_s * self._scale
                self._storage_free_at = load_done
                done = max(done, load_done + compute * self._scale)
            if self.storage is not None:
                self._store_computed(req, alloc, gpu_hit + cpu_hit + disk_blocks, done)
            req.scheduled_at = now
            req.next_at = done
            req.modelled_ttft = cfg.request_overhead_s + compute + disk_s  # without queueing
            self.running.append(req)

    def _busy_adapters(self) -> set[str]:
        """Adapters running requests use (their slots cannot be swapped out)."""
        return {r.lora_name for r in self.running if r.lora_name}

    def _next_admissible(self) -> SimRequest | None:
        """The first waiting request that can start: FCFS, but a LoRA request whose adapter
        finds no slot is skipped for later ones, as vLLM's scheduler does."""
        busy: set[str] | None = None
        for req in self.waiting:
            if not req.lora_name:
                return req
            if busy is None:
                busy = self._busy_adapters()
            if self.lora.can_run(req.lora_name, busy):
                return req
        return None

    # ------------------------------------------------------------------ the storage tier

    def _hit_limit(self, req: SimRequest) -> int:
        """Blocks of the prompt that can hit at most (vLLM computes the last token)."""
        return min(len(req.hashes), max(0, (len(req.prompt_ids) - 1) // self.cfg.block_size))

    def _storage_ready(self, req: SimRequest) -> bool:
        """Whether the request's storage lookup is done; starts it when the directory has
        the first block its GPU and CPU tiers miss (a ``stat``), else settles at no hit."""
        if req.storage_verified is not None:
            return True
        if req.storage_probe is not None:
            return False
        storage = self.storage
        assert storage is not None
        gpu_hit, cpu_hit = self.cache.match(req.hashes, len(req.prompt_ids))
        start, limit = gpu_hit + cpu_hit, self._hit_limit(req)
        if start >= limit or not storage.may_hold(req.hashes[start]):
            req.storage_verified = frozenset()
            return True
        task = asyncio.create_task(self._probe(req, start, limit),
                                   name=f"sim-storage-probe-{req.request_id}")
        req.storage_probe = task
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
        return False

    async def _probe(self, req: SimRequest, start: int, limit: int) -> None:
        """Read and verify the prompt's blocks from ``start`` until one is missing or bad."""
        storage = self.storage
        assert storage is not None
        bs = self.cfg.block_size
        hashes = req.hashes[start:limit]
        tokens = [req.prompt_ids[i * bs:(i + 1) * bs] for i in range(start, limit)]
        corrupt = storage.files.stats.corrupt + storage.mismatched
        try:
            found = await storage.probe(hashes, tokens)
        except asyncio.CancelledError:
            raise
        except Exception:  # a failed lookup is a miss, never a dead engine
            log.exception("storage_lookup_failed", engine=self.index)
            found = 0
        if storage.files.stats.corrupt + storage.mismatched > corrupt:
            # vLLM finds the file, fails to load it and recomputes the block.
            self.metrics.on_storage_promotion_failed(STORAGE_TIER_LABEL)
        req.storage_verified = frozenset(hashes[:found])
        req.storage_probe = None
        self._wake.set()

    def _storage_hits(self, req: SimRequest, gpu_hit: int, cpu_hit: int) -> int:
        """Blocks loaded from storage after the GPU and CPU hits; counts the lookups as
        vLLM's tiering manager does (the CPU primary tier first, the storage tier on its
        miss, until a block is missing from both)."""
        verified = req.storage_verified or frozenset()
        limit = self._hit_limit(req)
        start = gpu_hit + cpu_hit
        hits = 0
        while start + hits < limit and req.hashes[start + hits] in verified:
            hits += 1
        missed = 1 if start + hits < limit else 0
        self.metrics.on_tier_lookup(PRIMARY_TIER_LABEL, cpu_hit + hits + missed, cpu_hit)
        self.metrics.on_tier_lookup(STORAGE_TIER_LABEL, hits + missed, hits)
        return hits

    def _store_computed(self, req: SimRequest, alloc: Allocation, loaded: int,
                        done: float) -> None:
        """Queue the prompt blocks this request computes (not the ``loaded`` first ones it
        hit or loaded) for the storage tier, to be written once its prefill is done at
        ``done``."""
        assert self.storage is not None
        skip = set(req.hashes[:loaded])
        blocks = [self._to_store(h, req) for h in alloc.held if h not in skip]
        self.storage.store([b for b in blocks if b is not None], done)

    def _to_store(self, h: bytes, req: SimRequest) -> BlockToStore | None:
        """The cached block ``h`` as a store job carries it (None if it is gone)."""
        blk = self.cache.blocks.get(h)
        if blk is None:
            return None
        return BlockToStore(h, blk.parent, blk.token_ids,
                            req.lora_id, blk.lora_name, blk.extra)

    # ------------------------------------------------------------------ remote KV (decode)

    def _start_read(self, req: SimRequest, now: float, local_blocks: int) -> None:
        """Admitted with a remote prefill: read the prompt's other blocks over the link."""
        cfg = self.cfg
        bs = cfg.block_size
        n = len(req.prompt_ids)
        blocks = -(-n // bs) - local_blocks
        nbytes = blocks * bs * cfg.kv_bytes_per_token
        xfer_s = nbytes / cfg.kv_transfer_bytes_per_s
        req.external_tokens = n - req.cached_tokens
        ready = now + cfg.request_overhead_s * self._scale
        start = max(ready, self._link_free_at)  # one read at a time on the engine's NIC
        done = start + xfer_s * self._scale
        self._link_free_at = done
        req.scheduled_at = now
        req.xfer_start = start
        req.modelled_ttft = cfg.request_overhead_s + xfer_s + self._itl(now)
        self.fetching[req] = asyncio.create_task(
            self._read(req, done, xfer_s, nbytes, blocks), name=f"sim-kv-read-{req.request_id}")

    async def _read(self, req: SimRequest, done: float, xfer_s: float, nbytes: int,
                    blocks: int) -> None:
        """Wait out the modelled transfer, then read (the prefill engine must still be
        there, as NIXL's must); on success the request runs its first decode step."""
        delay = done - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        remote = req.remote_prefill
        assert remote is not None and self.kv_client is not None
        try:
            outcome = await self.kv_client.pull(remote)
        except asyncio.CancelledError:
            raise
        except Exception:  # a read never takes the engine down
            log.exception("kv_read_failed", engine=self.index)
            outcome = PullOutcome.FAILED
        req.kv_read = True
        self.fetching.pop(req, None)
        if req.finished:
            return
        if outcome is PullOutcome.FAILED:
            # kv_load_failure_policy "fail" (vLLM's default): the request ends in error.
            self.metrics.on_kv_transfer_failed()
            self._finish(req, "error")
            return
        self.metrics.on_kv_transfer(xfer_s, nbytes, blocks)
        if req.alloc is not None:
            self.cache.cache_loaded(
                req.alloc, req.hashes, req.prompt_ids, req.lora_name,
                req.lora_id, partial(self._event_extra, req))
        now = time.monotonic()
        req.next_at = now + self._itl(now) * self._scale  # recompute the last prompt token
        self.running.append(req)
        self._wake.set()

    def release_remote(self, remote: RemotePrefill) -> None:
        """A decode ended before reading: tell its prefill engine to free the blocks (vLLM
        sends the read-done notification with no blocks read)."""
        client = self.kv_client
        if client is None or remote.problem is not None:
            return

        async def release() -> None:
            await client.pull(remote)

        task = asyncio.get_running_loop().create_task(release())
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _heartbeats(self) -> None:
        """While decodes wait for remote KV, extend their leases every lease / 6 (vLLM's
        heartbeat interval), one message per prefill engine."""
        assert self.kv_client is not None
        interval = self.cfg.kv_lease_s / 6
        while True:
            if not self._awaiting_kv():
                self._hb_wake.clear()
                await self._hb_wake.wait()
                continue
            await asyncio.sleep(interval)
            peers: dict[tuple[str, int, str], list[str]] = defaultdict(list)
            for r in self._awaiting_kv():
                assert r.remote_prefill is not None
                peers[r.remote_prefill.peer].append(r.remote_prefill.request_id)
            await asyncio.gather(*(
                self.kv_client.heartbeat(host, port, engine_id, ids)
                for (host, port, engine_id), ids in peers.items()), return_exceptions=True)

    def _awaiting_kv(self) -> list[SimRequest]:
        """Decodes whose remote blocks are still to be read."""
        out = [r for r in self.waiting if r.remote_prefill is not None
               and r.remote_prefill.problem is None]
        out += [r for r in self.fetching if not r.kv_read]
        return out

    # ------------------------------------------------------------------ held KV (prefill)

    def _hold(self, req: SimRequest, alloc: Allocation) -> None:
        """A prefill for a remote decode finished normally: keep its blocks on a lease and
        answer with vLLM's kv_transfer_params."""
        bs = self.cfg.block_size
        num_tokens = len(req.prompt_ids) + len(req.output_ids) - 1  # vLLM: num_computed
        nblocks = max(1, -(-num_tokens // bs))
        cap = self.cfg.num_gpu_blocks
        block_ids = [(self._next_block_id + i) % cap for i in range(nblocks)]
        self._next_block_id = (self._next_block_id + nblocks) % cap
        self.leases.hold(req.request_id, alloc, block_ids, num_tokens)
        host, port = self.kv_address or (self.cfg.http_host, 0)
        req.kv_params = producer_params(
            engine_id=self.engine_id, request_id=req.request_id, host=host, port=port,
            block_ids=block_ids, num_tokens=num_tokens, cached_tokens=req.cached_tokens)

    def read_held(self, request_id: str, engine_id: str,
                  block_ids: list[int]) -> tuple[int, int] | None:
        """A decode engine reads a lease's blocks (``POST /sim/kv_transfer``): release them
        and return (tokens, blocks); None when no such lease is held (expired or unknown,
        counted as vLLM counts a read after expiry). Raises ValueError when the reader
        names another engine or other blocks."""
        if engine_id != self.engine_id:
            raise ValueError(f"engine {engine_id!r} is not this engine ({self.engine_id})")
        lease = self.leases.take(request_id)
        if lease is None:
            self.metrics.on_kv_read_after_expiry()
            log.error("kv_read_after_expiry", engine=self.index, request_id=request_id)
            return None
        if list(block_ids) != lease.block_ids:
            self._release_lease(lease.alloc)
            raise ValueError("the blocks named are not the blocks this request holds")
        self._release_lease(lease.alloc)
        return lease.num_tokens, len(lease.block_ids)

    def extend_leases(self, engine_id: str, request_ids: list[str]) -> int:
        """A heartbeat from a decode engine; the number of leases it extended."""
        if engine_id != self.engine_id:
            return 0
        return self.leases.extend(request_ids)

    def _release_lease(self, alloc: Allocation) -> None:
        self.cache.release(alloc)
        self._wake.set()

    def _lease_expired(self, request_id: str) -> None:
        self.metrics.on_kv_expired()
        log.warning("kv_lease_expired", engine=self.index, request_id=request_id,
                    msg="Releasing expired KV blocks")

    def _itl(self, now: float) -> float:
        cfg = self.cfg
        itl = cfg.itl_s + cfg.itl_per_seq_s * len(self.running)
        if self._prefill_free_at > now:
            itl *= 1.0 + cfg.prefill_itl_penalty
        return itl

    def _step(self, now: float) -> None:
        itl = self._itl(now)
        step = itl * self._scale
        bs = self.cfg.block_size
        done: list[tuple[SimRequest, str]] = []
        computed = 0  # tokens this step ran through the model: prefills ending now + decodes
        for req in self.running:
            if req.next_at > now:
                continue
            tok = self._vocab[req.rng.randrange(len(self._vocab))] if req.rng else self._vocab[0]
            first = not req.output_ids
            req.output_ids.append(tok)
            computed += 1
            if first:
                computed += len(req.prompt_ids) - req.cached_tokens - req.external_tokens
                req.first_token_at = now
                ttft = (now - req.arrival) / self._scale if self._scale else req.modelled_ttft
                self.metrics.on_first_token(ttft)
            else:
                gap = (now - req.last_token_at) / self._scale if self._scale else itl
                self.metrics.on_token(gap)
            req.last_token_at = now
            # vLLM caches a block once all its tokens are computed (all but the newest one).
            alloc = req.alloc
            if alloc is not None:
                total = len(req.prompt_ids) + len(req.output_ids)
                while total - 1 >= (len(alloc.chain) + 1) * bs:
                    self._cache_generated(req, alloc)
            reason = (
                "stop" if tok in req.stop_token_ids
                else "length" if len(req.output_ids) >= req.max_tokens
                else None
            )
            req.out.put_nowait((tok, reason))
            if reason is not None:
                done.append((req, reason))
            else:
                req.next_at = max(req.next_at + step, now) if step else now
        if computed:
            self.metrics.on_step(computed)
        for req, reason in done:
            self._finish(req, reason, notify=False)

    def _event_extra(self, req: SimRequest, block: int) -> tuple[Any, ...] | None:
        """Block ``block``'s extra keys in the untagged form vLLM's events carry."""
        return event_extra_keys(block_extra_keys(
            block * self.cfg.block_size, lora_name=req.lora_name, lora_path=req.lora_path,
            cache_salt=req.cache_salt))

    def _cache_generated(self, req: SimRequest, alloc: Allocation) -> None:
        bs = self.cfg.block_size
        k = len(alloc.chain)
        seq = req.prompt_ids + req.output_ids
        toks = seq[k * bs : (k + 1) * bs]
        extra = block_extra_keys(
            k * bs, lora_name=req.lora_name, lora_path=req.lora_path, cache_salt=req.cache_salt
        )
        parent = alloc.chain[-1] if alloc.chain else None
        h = self.hasher.hash_block(parent, toks, extra)
        self.cache.cache_generated(
            alloc, h, toks, req.lora_name, req.lora_id,
            event_extra_keys(extra),
        )
        if self.storage is not None and alloc.held and alloc.held[-1] == h:
            block = self._to_store(h, req)
            if block is not None:
                self.storage.store([block], time.monotonic())

    def _finish(self, req: SimRequest, reason: str, notify: bool = True) -> None:
        if req.finished:
            return
        req.finished = True
        if req in self.running:
            self.running.remove(req)
        task = self.fetching.pop(req, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if req.remote_prefill is not None and not req.kv_read:
            req.kv_read = True  # once: a second release would read as one after expiry
            self.release_remote(req.remote_prefill)
        if req.alloc is not None:
            if (req.remote_decode and self.cfg.kv_connector
                    and reason in ("length", "stop") and req.output_ids):
                self._hold(req, req.alloc)
            else:
                self.cache.release(req.alloc)
        now = time.monotonic()
        scale = self._scale or 1.0
        if req.output_ids:
            e2e = (now - req.arrival) / scale if self._scale else req.modelled_ttft
            queue_s = (req.scheduled_at - req.arrival) / scale if self._scale else 0.0
            decode_s = (now - req.first_token_at) / scale if self._scale else 0.0
            prefill_s = (
                (req.first_token_at - req.scheduled_at) / scale if self._scale
                else req.modelled_ttft
            )
            self.metrics.on_finished(
                reason, len(req.prompt_ids), len(req.output_ids), e2e, queue_s,
                prefill_s, decode_s, cached_tokens=req.cached_tokens,
                external_cached_tokens=req.external_tokens, max_tokens=req.max_tokens,
                reported_cached_tokens=self.reported_cached(req),
            )
        elif reason == "error":  # vLLM records an errored request, with no prefill stats
            e2e = (now - req.arrival) / scale if self._scale else 0.0
            queue_s = (req.scheduled_at - req.arrival) / scale if self._scale else 0.0
            self.metrics.on_finished(
                reason, len(req.prompt_ids), 0, e2e, queue_s, 0.0, 0.0,
                max_tokens=req.max_tokens, prefilled=False, reported_cached_tokens=0)
        if notify:
            req.out.put_nowait((None, reason))
        self._wake.set()

    async def _publish_events(self) -> None:
        events = self.cache.drain_events()
        if self.storage is not None:
            events += self.storage.drain_events()
        if not events or self.publisher is None:
            return
        payload = self._encoder.encode(time.time(), events, 0)
        await self.publisher.publish(payload)

    def reported_cached(self, req: SimRequest) -> int:
        """The request's cached prompt tokens as vLLM reports them (usage, metrics): a
        decode reports its prefill engine's own hits when the prefill said so."""
        remote = req.remote_prefill
        if remote is not None and req.kv_read and remote.cached_tokens is not None:
            return remote.cached_tokens
        return req.cached_tokens + req.external_tokens

    def _update_gauges(self) -> None:
        if self.cfg.kv_connector:
            # Decodes reading remote KV wait, held back ("deferred"), as in vLLM.
            now = time.monotonic()
            started = sum(1 for r in self.fetching if r.xfer_start <= now)
            self.metrics.set_kv_fetch(len(self.fetching) - started, started)
            self.metrics.set_queue(len(self.running), len(self.waiting),
                                   deferred=len(self.fetching))
        else:
            self.metrics.set_queue(len(self.running), len(self.waiting))
        self.metrics.set_kv_usage(self.cache.usage())
        if self.lora.enabled:
            running = sorted({r.lora_name for r in self.running if r.lora_name})
            waiting = sorted({r.lora_name for r in self.waiting if r.lora_name})
            if (running, waiting) != self._lora_state:  # vLLM stamps a series per change
                self._lora_state = (running, waiting)
                self.metrics.set_lora_info(running, waiting, self.cfg.max_loras)

    # ------------------------------------------------------------------ introspection

    def cache_contents(self) -> dict[str, Any]:
        """Cached block hashes per tier as the engine's events name them."""
        wire = to_wire if self.cfg.int_block_hashes else (lambda h: h.hex())
        out = {tier: [wire(h) for h in hs] for tier, hs in self.cache.contents().items()}
        if self.storage is not None:
            out["STORAGE"] = [wire(h) for h in self.storage.keys()]
        return out


def _env_seed() -> str | None:
    import os

    return os.environ.get("PYTHONHASHSEED")


_WORD = re.compile(r"^ ?[a-z]{2,12}$")


def sampling_vocab(tokenizer: Any) -> list[int]:
    """Token ids that decode to a plain word, so generated text reads as text."""
    ids = []
    for i in range(tokenizer.vocab_size):
        try:
            s = tokenizer.decode([i], skip_special_tokens=True)
        except Exception:
            continue
        if _WORD.match(s):
            ids.append(i)
    return ids or list(range(min(tokenizer.vocab_size, 1000)))
