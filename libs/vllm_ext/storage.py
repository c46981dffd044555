"""The shared-storage tier's work, apart from vLLM's types: jobs on I/O threads, events, counters.

A job moves whole chunks between the CPU tier's offload region (a flat byte buffer, one chunk
every ``chunk_bytes``) and a :class:`~infermesh.libs.kvstore.BlockStore`. vLLM's scheduler calls
the tier and must not block, so :meth:`StorageTierCore.submit_store` and
:meth:`~StorageTierCore.submit_load` only queue the job; I/O threads do it (loads on threads of
their own, so a burst of stores never delays a request waiting for its prefix), and
:meth:`~StorageTierCore.finished` hands back what completed since the last call.

What the tier tells the index comes out of :meth:`~StorageTierCore.take_events`, in order:
blocks now in storage (written by this engine, or found already there: the index treats stores
idempotently), and blocks this engine removed — evicted over capacity, or found corrupt or gone
when it tried to load them. A failure never raises into vLLM: it fails that job (vLLM then
recomputes, or keeps the block only in the CPU tier) and is counted.

Standard library only: it runs inside vLLM, and its tests run without it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, fields

from infermesh.libs.kvstore import BlockStore


@dataclass(frozen=True)
class FinishedJob:
    """A job that completed: ``loaded`` lists, for a failed load, the keys that did load (the
    rest are misses); it is None when the job succeeded whole or was a store."""

    job_id: int
    success: bool
    seconds: float
    nbytes: int
    loaded: tuple[bytes, ...] | None = None


@dataclass(frozen=True)
class TierEvent:
    """Keys that entered (``removed`` False) or left this tier."""

    keys: tuple[bytes, ...]
    removed: bool


@dataclass
class TierCounters:
    """What the tier did; :meth:`StorageTierCore.take_counters` returns the change since the
    last call (exported as vLLM metrics by the tier)."""

    blocks_written: int = 0
    blocks_present: int = 0  # a store found the block already there (another engine wrote it)
    blocks_loaded: int = 0
    load_misses: int = 0  # a load found no good file: missing, unreadable or corrupt
    corrupt_blocks: int = 0
    write_errors: int = 0
    read_errors: int = 0
    evicted_blocks: int = 0
    failed_store_jobs: int = 0
    failed_load_jobs: int = 0

    def minus(self, other: TierCounters) -> TierCounters:
        """The difference ``self - other``, field by field."""
        return TierCounters(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                               for f in fields(self)})

    def as_dict(self) -> dict[str, int]:
        """Field → value."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class _State:
    finished: queue.SimpleQueue[FinishedJob] = field(default_factory=queue.SimpleQueue)
    events: list[TierEvent] = field(default_factory=list)
    counters: TierCounters = field(default_factory=TierCounters)
    reported: TierCounters = field(default_factory=TierCounters)


class StorageTierCore:
    """One engine's side of a shared block directory."""

    def __init__(
        self,
        store: BlockStore,
        region: memoryview,
        chunk_bytes: int,
        *,
        io_threads: int = 4,
        evict_every_s: float = 5.0,
        emit_events: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        flat = region.cast("B") if region.format != "B" or region.ndim != 1 else region
        if flat.nbytes % chunk_bytes:
            raise ValueError(f"region of {flat.nbytes} bytes is no whole number of "
                             f"{chunk_bytes}-byte chunks")
        self.store = store
        self.chunk_bytes = chunk_bytes
        self.num_chunks = flat.nbytes // chunk_bytes
        self.emit_events = emit_events
        self.evict_every_s = evict_every_s
        self._flat = flat
        self._clock = clock
        threads = max(1, io_threads)
        # Loads get threads of their own: a request waits on them, nobody waits on a store.
        self._loads = ThreadPoolExecutor(max(1, threads // 2), thread_name_prefix="im-kv-load")
        self._stores = ThreadPoolExecutor(threads, thread_name_prefix="im-kv-store")
        self._lock = threading.Lock()
        self._s = _State()
        self._pending: set[Future[None]] = set()
        self._evicting: Future[None] | None = None
        self._last_evict = clock()

    # ------------------------------------------------------------------ scheduler side

    def contains(self, key: bytes) -> bool:
        """Whether storage has a file for ``key`` (not verified: a load checks it)."""
        return self.store.contains(key)

    def submit_store(self, job_id: int, keys: Sequence[bytes], chunk_ids: Sequence[int]) -> None:
        """Queue writing chunk ``chunk_ids[i]`` of the region as block ``keys[i]``."""
        self._submit(self._stores, self._store_job, job_id, list(keys),
                     [int(c) for c in chunk_ids])

    def submit_load(self, job_id: int, keys: Sequence[bytes], chunk_ids: Sequence[int]) -> None:
        """Queue reading block ``keys[i]`` into chunk ``chunk_ids[i]`` of the region."""
        self._submit(self._loads, self._load_job, job_id, list(keys),
                     [int(c) for c in chunk_ids])

    def touch(self, keys: Sequence[bytes]) -> None:
        """Mark blocks as just used (LRU), off the caller's thread."""
        if keys:
            self._spawn(self._stores, lambda: [self.store.touch(k) for k in keys])

    def tick(self) -> None:
        """Once per scheduler step: every ``evict_every_s``, check the directory against its
        capacity (other engines fill it too) on an I/O thread."""
        if not self.store.capacity_bytes:
            return
        now = self._clock()
        if now - self._last_evict < self.evict_every_s:
            return
        if self._evicting is not None and not self._evicting.done():
            return
        self._last_evict = now
        self._evicting = self._spawn(self._stores, self._periodic_evict)

    def finished(self) -> list[FinishedJob]:
        """Jobs completed since the last call."""
        out: list[FinishedJob] = []
        while True:
            try:
                out.append(self._s.finished.get_nowait())
            except queue.Empty:
                return out

    def take_events(self) -> list[TierEvent]:
        """Stores and removals since the last call, in the order they happened."""
        with self._lock:
            out, self._s.events = self._s.events, []
        return out

    def take_counters(self) -> TierCounters:
        """The counters' change since the last call."""
        with self._lock:
            now = self._totals()
            delta = now.minus(self._s.reported)
            self._s.reported = now
        return delta

    def counters(self) -> TierCounters:
        """The counters since start."""
        with self._lock:
            return self._totals()

    def _totals(self) -> TierCounters:
        # The store counts file-level failures itself (several I/O threads share it).
        st = self.store.stats
        return TierCounters(**{**self._s.counters.as_dict(), "corrupt_blocks": st.corrupt,
                               "write_errors": st.write_errors, "read_errors": st.read_errors})

    def has_pending_work(self) -> bool:
        """Whether a job is still running or its result not yet collected."""
        with self._lock:
            busy = any(not f.done() for f in self._pending)
        return busy or not self._s.finished.empty()

    def drain(self) -> None:
        """Block until every queued job has completed (its result is then in :meth:`finished`)."""
        while True:
            with self._lock:
                pending = set(self._pending)
            if not pending:
                return
            wait_futures(pending)

    def shutdown(self) -> None:
        """Finish the queued jobs and stop the threads."""
        self.drain()
        self._loads.shutdown(wait=True)
        self._stores.shutdown(wait=True)

    # ------------------------------------------------------------------ I/O threads

    def _submit(self, pool: ThreadPoolExecutor,
                job: Callable[[int, list[bytes], list[int]], FinishedJob],
                job_id: int, keys: list[bytes], chunks: list[int]) -> None:
        if len(keys) != len(chunks):
            raise ValueError(f"job {job_id}: {len(keys)} keys for {len(chunks)} chunks")

        def run() -> None:
            t0 = time.perf_counter()
            try:
                result = job(job_id, keys, chunks)
            except Exception as e:  # a bug, not an I/O error: fail the job, keep the engine
                self._note_error(f"job {job_id}: {e!r}")
                result = FinishedJob(job_id, False, time.perf_counter() - t0, 0,
                                     loaded=() if job is self._load_job else None)
            self._s.finished.put(result)

        self._spawn(pool, run)

    def _spawn(self, pool: ThreadPoolExecutor, fn: Callable[[], object]) -> Future[None]:
        def call() -> None:
            fn()

        fut = pool.submit(call)
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, fut: Future[None]) -> None:
        with self._lock:
            self._pending.discard(fut)

    def _chunk(self, chunk: int) -> memoryview:
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"chunk {chunk} outside the region (0..{self.num_chunks - 1})")
        start = chunk * self.chunk_bytes
        return self._flat[start:start + self.chunk_bytes]

    def _store_job(self, job_id: int, keys: list[bytes], chunks: list[int]) -> FinishedJob:
        t0 = time.perf_counter()
        stored: list[bytes] = []
        written = present = errors = 0
        for key, chunk in zip(keys, chunks, strict=True):
            if self.store.touch(key):
                present += 1
            elif self.store.put(key, self._chunk(chunk)):
                written += 1
            elif self.store.contains(key):  # another engine wrote it meanwhile
                present += 1
            else:
                errors += 1
                continue
            stored.append(key)
        evicted = self.store.take_evicted()
        with self._lock:
            c = self._s.counters
            c.blocks_written += written
            c.blocks_present += present
            c.evicted_blocks += len(evicted)
            c.failed_store_jobs += bool(errors)
            if self.emit_events:
                if stored:
                    self._s.events.append(TierEvent(tuple(stored), removed=False))
                if evicted:
                    self._s.events.append(TierEvent(tuple(evicted), removed=True))
        return FinishedJob(job_id, not errors, time.perf_counter() - t0,
                           written * self.chunk_bytes)

    def _load_job(self, job_id: int, keys: list[bytes], chunks: list[int]) -> FinishedJob:
        t0 = time.perf_counter()
        loaded: list[bytes] = []
        gone: list[bytes] = []
        for key, chunk in zip(keys, chunks, strict=True):
            # read_into copies only a verified payload: a bad file leaves the chunk untouched.
            if self.store.read_into(key, self._chunk(chunk)):
                loaded.append(key)
            elif not self.store.contains(key):
                gone.append(key)  # removed (corrupt) or evicted meanwhile: the index must know
        misses = len(keys) - len(loaded)
        with self._lock:
            c = self._s.counters
            c.blocks_loaded += len(loaded)
            c.load_misses += misses
            c.failed_load_jobs += bool(misses)
            if self.emit_events and gone:
                self._s.events.append(TierEvent(tuple(gone), removed=True))
        return FinishedJob(job_id, not misses, time.perf_counter() - t0,
                           len(loaded) * self.chunk_bytes,
                           loaded=None if not misses else tuple(loaded))

    def _periodic_evict(self) -> None:
        evicted = self.store.take_evicted() + self.store.evict()
        if not evicted:
            return
        with self._lock:
            self._s.counters.evicted_blocks += len(evicted)
            if self.emit_events:
                self._s.events.append(TierEvent(tuple(evicted), removed=True))

    def _note_error(self, msg: str) -> None:
        with self._lock:
            self.store.stats.error(msg)
