"""The block index: block key → {(pod, tier)}, each pod's engine hash → block key, and lookups.

Keys are our own (``libs/kvblock``), recomputed from the token ids of every stored block, so the
index does not depend on the engines' hash seed or algorithm. A block that comes without tokens
(an offload to CPU) is keyed through its pod's engine-hash map.

Layout, chosen for the lookup path (one prompt walks up to thousands of keys):

* every pod gets a small slot number; per key the index keeps, as int bit masks over slots, the
  pods that hold it at all (in LRU order) and the pods that hold it per tier, so the set of pods
  still matching a prompt is one ``&`` per block;
* a pod's engine-hash map holds its blocks, and a reverse map says which engine hash put the pod
  on a key, so evicting a key (LRU, past ``max_blocks`` entries) forgets the pods' side too;
  hashes of removed blocks stay known for a while (``retired``), and a block whose parent is not
  known yet waits (``orphans``) until it is;
* every map is ``int → int``: CPython's garbage collector does not track such dicts, so an index
  of millions of blocks adds nothing to collection pauses (which would land on lookups);
* blocks in storage the whole pool shares (tier ``SHARED_STORAGE``: any engine mounting the
  directory can load them) are held by the pool, not by the pod whose engine wrote them: a
  pseudo-pod per pool (``storage:<pool>``, a name no real pod can have) holds them, so they
  outlive that pod, and a lookup credits every pod of the pool with the pool's run of blocks
  past its own. Such blocks usually come without tokens (vLLM's placeholders): the writing
  pod's engine-hash map keys them. Storage that never reports removals ages out by a TTL or a
  per-pool block cap (:meth:`KVIndex.expire_storage`);
* each held key's parent key is kept, and per pod the number of its keys whose parent it does not
  hold (its *holes*). A pod without holes holds whole chains from their first block (what vLLM's
  tail-first eviction leaves), so along a prompt's keys it holds a prefix and nothing after: the
  lookup finds where it stops by bisection, reading a few dozen keys of a 100k-token prompt
  instead of every one. Pods with holes are walked block by block.
"""

from __future__ import annotations

import heapq
import time
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from itertools import accumulate, repeat
from operator import and_
from typing import Any

from infermesh.libs import kvblock
from infermesh.proto.messages import (
    TIER_SHARED,
    TIERS,
    AllBlocksCleared,
    AnyKVEvent,
    BlockRemoved,
    BlockStored,
    PodMatch,
    SnapshotBlock,
)

_UNKNOWN = -1  # the parent of a key stored without one (an offload known by its engine hash)

STORAGE_PREFIX = "storage:"  # pool storage pseudo-pods: ":" is never in a pod name


def storage_holder(pool: str) -> str:
    """The pseudo-pod holding ``pool``'s shared-storage blocks."""
    return STORAGE_PREFIX + pool


def _neg_bits(mask: int) -> int:
    """Sort key of a shrinking run of pod masks (bisection finds where one loses a pod)."""
    return -mask.bit_count()


class IndexStats:
    """Counters of what the index and the stream tracker did (exported by the metrics module)."""

    def __init__(self) -> None:
        self.events: dict[str, int] = {"BlockStored": 0, "BlockRemoved": 0, "AllBlocksCleared": 0}
        self.blocks_stored = 0
        self.blocks_removed = 0
        self.unkeyable = 0
        self.evictions = 0
        self.batches = 0
        self.stale_batches = 0
        self.bad_messages: dict[str, int] = {"kv": 0, "pod": 0}
        self.gaps: dict[str, int] = {"seq": 0, "epoch": 0, "unknown_pod": 0, "heartbeat": 0,
                                     "unkeyable": 0, "model": 0}
        self.snapshots_requested = 0
        self.snapshots_failed = 0
        self.snapshots_applied = 0
        self.buffer_overflows = 0
        self.pods_dropped = 0
        self.lookups = 0
        self.lookup_reads = 0  # keys read by lookups (bisection reads few of a long prompt's)
        self.storage_stored = 0  # shared-storage blocks taken into a pool's holder
        self.storage_removed = 0  # … removed by an engine's event
        self.storage_expired = 0  # … aged out (TTL or the per-pool cap)


class PodBlocks:
    """One pod's side of the index: its engine hashes and what cannot be keyed yet."""

    __slots__ = ("name", "slot", "bit", "model", "keys", "masks", "rev", "retired", "orphans",
                 "orphan_parent", "kids", "holes")

    def __init__(self, name: str, slot: int) -> None:
        self.name = name
        self.slot = slot
        self.bit = 1 << slot
        self.model = ""
        self.keys: dict[int, int] = {}  # engine hash → key
        self.masks: dict[int, int] = {}  # engine hash → tiers holding it (bit per tier id)
        self.rev: dict[int, int] = {}  # key → the engine hash that put this pod on it
        self.retired: OrderedDict[int, int] = OrderedDict()  # engine hash → key, oldest first
        # parent engine hash → {engine hash: [tokens, extra keys, tier mask]}
        self.orphans: dict[int, dict[int, list[Any]]] = {}
        self.orphan_parent: dict[int, int] = {}  # engine hash → parent hash, oldest first
        self.kids: dict[int, int] = {}  # key → how many of this pod's keys have it as parent
        self.holes = 0  # this pod's keys whose parent it does not hold (or is not known)


class KVIndex:
    """Which pods hold which block keys, in which tier. Applying events is idempotent."""

    def __init__(
        self,
        max_blocks: int = 4_000_000,
        *,
        retired_per_pod: int = 8192,
        orphans_per_pod: int = 8192,
        storage_ttl_s: float = 0.0,
        storage_max_blocks: int = 0,
        stats: IndexStats | None = None,
    ) -> None:
        self.max_blocks = max_blocks
        # Pool storage that reports no removals (vLLM's own fs tier) ages out: 0 means never.
        self.storage_ttl_s = storage_ttl_s
        self.storage_max_blocks = storage_max_blocks
        self.pool_of: dict[str, str] = {}  # pod → its pool (known from batches or heartbeats)
        # pool → {engine hash: when stored or last reported}, oldest first
        self._stamps: dict[str, OrderedDict[int, float]] = {}
        self.retired_per_pod = retired_per_pod
        self.orphans_per_pod = orphans_per_pod
        self.stats = stats if stats is not None else IndexStats()
        self.entries = 0  # (key, pod) pairs
        self.pods: dict[str, PodBlocks] = {}
        self._held: OrderedDict[int, int] = OrderedDict()  # key → pods; least recently used first
        self._tiers: list[dict[int, int]] = [{} for _ in TIERS]  # per tier id: key → pods
        self._slots: dict[int, PodBlocks] = {}
        self._free: list[int] = []  # slots of dropped pods, lowest reused first
        self._tier_ids: dict[str, int] = {t: i for i, t in enumerate(TIERS)}
        self._tier_names: list[str] = list(TIERS)
        self._seeds: dict[str, int] = {}
        self._roots: set[int] = set()  # the seeds: the parent of every first block
        self._parent: dict[int, int] = {}  # held key → its parent key (_UNKNOWN if not known)

    def __len__(self) -> int:
        """Distinct block keys held by at least one pod."""
        return len(self._held)

    # ------------------------------------------------------------------ pods and tiers

    def pod(self, name: str) -> PodBlocks:
        """The pod's entry, created (with a free slot) if new."""
        p = self.pods.get(name)
        if p is None:
            slot = heapq.heappop(self._free) if self._free else len(self._slots)
            p = self.pods[name] = self._slots[slot] = PodBlocks(name, slot)
        return p

    def drop_pod(self, name: str) -> bool:
        """Forget a pod and every block it holds; False if it was not known."""
        p = self.pods.pop(name, None)
        self.pool_of.pop(name, None)
        if p is None:
            return False
        self._forget(p)
        del self._slots[p.slot]
        heapq.heappush(self._free, p.slot)
        return True

    def clear_pod(self, name: str) -> None:
        """Drop every block of a pod (the pod stays known)."""
        p = self.pods.get(name)
        if p is not None:
            self._forget(p)

    def pod_blocks(self, name: str) -> dict[int, tuple[int, list[str]]]:
        """engine hash → (key, tiers) of one pod (for tests and debugging)."""
        p = self.pods.get(name)
        if p is None:
            return {}
        return {h: (k, self._tiers_of(p.masks[h])) for h, k in p.keys.items()}

    def holders(self, key: int) -> dict[str, list[str]]:
        """pod → tiers holding one key (for tests and debugging)."""
        out: dict[str, list[str]] = {}
        for slot, p in self._slots.items():
            tiers = [self._tier_names[t] for t, d in enumerate(self._tiers)
                     if d.get(key, 0) >> slot & 1]
            if tiers:
                out[p.name] = tiers
        return out

    def tier_id(self, tier: str) -> int:
        """The tier's position in preference order (media we do not know rank last)."""
        t = self._tier_ids.get(tier)
        if t is None:
            t = self._tier_ids[tier] = len(self._tier_names)
            self._tier_names.append(tier)
            self._tiers.append({})
        return t

    def _tiers_of(self, mask: int) -> list[str]:
        return [n for i, n in enumerate(self._tier_names) if mask >> i & 1]

    def seed(self, model: str) -> int:
        """The parent key of every first block of ``model`` (cached)."""
        s = self._seeds.get(model)
        if s is None:
            s = self._seeds[model] = kvblock.model_seed(model)
            self._roots.add(s)
        return s

    # ------------------------------------------------------------------ events

    def set_pool(self, name: str, pool: str) -> None:
        """Record the pool of pod ``name`` (whose shared storage it can load from); the pod is
        known from now on, blocks or not."""
        if pool and self.pool_of.get(name) != pool:
            self.pool_of[name] = pool
            self.pod(name)

    def apply(self, name: str, model: str, events: Iterable[AnyKVEvent],
              pool: str | None = None) -> int:
        """Apply one pod's events in order; return how many blocks could not be keyed.

        With ``pool``, blocks in shared storage go to the pool's holder instead of the pod.
        Raises ``OverflowError`` or ``ValueError`` on token ids that are not uint32s (a malformed
        event); the events before it stay applied.
        """
        if pool:
            self.set_pool(name, pool)
        p = self.pod(name)
        if model != p.model:
            if p.model:  # same engine hashes, other keys: nothing we knew holds any more
                self._forget(p)
                p.retired.clear()
            p.model = model
        seed = self.seed(model)
        stats = self.stats
        missing = 0
        holder = self._holder(pool, model) if pool else None
        for ev in events:
            if isinstance(ev, BlockStored):
                if holder is not None and ev.tier == TIER_SHARED:
                    missing += self._stored_shared(p, holder, pool, ev, seed)  # type: ignore[arg-type]
                else:
                    missing += self._stored(p, ev, seed)
            elif isinstance(ev, BlockRemoved):
                tid = self.tier_id(ev.tier)
                if holder is not None and ev.tier == TIER_SHARED:
                    stamps = self._stamps[pool]  # type: ignore[index]
                    for h in ev.block_hashes:
                        if h in holder.masks:
                            stats.storage_removed += 1
                        self._remove(holder, h, tid)
                        stamps.pop(h, None)
                else:
                    for h in ev.block_hashes:
                        self._remove(p, h, tid)
                stats.blocks_removed += len(ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                if ev.tier is None:
                    self._forget(p)
                else:
                    self._clear_tier(p, self.tier_id(ev.tier))
            stats.events[type(ev).__name__] += 1
        stats.unkeyable += missing
        self._evict()
        return missing

    def _stored(self, p: PodBlocks, ev: BlockStored, seed: int) -> int:
        hashes = ev.block_hashes
        n = len(hashes)
        if not n:
            return 0
        self.stats.blocks_stored += n
        tid = self.tier_id(ev.tier)
        bs = ev.block_size
        toks = ev.token_ids
        known = p.keys
        if not (bs > 0 and len(toks) >= n * bs):
            # No tokens (an offload): the blocks are known by their engine hash, or not at all.
            missing = 0
            for h in hashes:
                k = known.get(h)
                if k is None:
                    k = p.retired.get(h)
                if k is None:
                    missing += 1
                else:
                    self._link(p, h, k, tid)
            return missing
        extras = ev.extra_keys
        if extras is not None and len(extras) != n:
            extras = None  # not one entry per block: fall back to what the LoRA name gives
        lora = (ev.lora_name,) if ev.lora_name else None
        ph = ev.parent_hash
        parent: int | None = seed
        if ph is not None:
            parent = known.get(ph)
            if parent is None:
                parent = p.retired.get(ph)
        if parent is None:
            prev = ph
            for i, h in enumerate(hashes):
                extra = extras[i] if extras is not None else lora
                self._park(p, prev, h, toks[i * bs : (i + 1) * bs], extra, 1 << tid)  # type: ignore[arg-type]
                prev = h
            return n
        keys = []
        key = kvblock.key
        first_parent = parent
        for i, h in enumerate(hashes):
            k = known.get(h)
            if k is None:
                extra = extras[i] if extras is not None else lora
                k = key(parent, toks[i * bs : (i + 1) * bs], extra)
            keys.append(k)
            parent = k
        # Children first, so that in LRU order a parent is always fresher than its children.
        for i in range(n - 1, -1, -1):
            self._link(p, hashes[i], keys[i], tid, keys[i - 1] if i else first_parent)
        if ph is not None:
            pk = known.get(ph)
            if pk is not None and pk in self._held:
                self._held.move_to_end(pk)
        return 0

    # ------------------------------------------------------------------ pool storage

    def _holder(self, pool: str, model: str) -> PodBlocks:
        """The pool's storage pseudo-pod (created on first use)."""
        h = self.pod(storage_holder(pool))
        if model != h.model:
            if h.model:  # the pool now serves another model: its stored keys mean nothing
                self._forget(h)
                h.retired.clear()
                self._stamps.pop(pool, None)
            h.model = model
        self._stamps.setdefault(pool, OrderedDict())
        return h

    def _resolve(self, h: int, *maps: dict[int, int]) -> int | None:
        for m in maps:
            k = m.get(h)
            if k is not None:
                return k
        return None

    def _stored_shared(self, src: PodBlocks, holder: PodBlocks, pool: str, ev: BlockStored,
                       seed: int) -> int:
        """Blocks ``src``'s engine wrote to the pool's shared storage: keyed by their tokens
        when the event has them, else through the writer's (or the pool's) engine-hash map."""
        hashes = ev.block_hashes
        n = len(hashes)
        if not n:
            return 0
        self.stats.blocks_stored += n
        tid = self.tier_id(TIER_SHARED)
        bs = ev.block_size
        toks = ev.token_ids
        have = bs > 0 and len(toks) >= n * bs
        maps = (holder.keys, src.keys, src.retired, holder.retired)
        ph = ev.parent_hash
        parent: int | None
        if ph is None:
            parent = seed if have else None
        else:
            parent = self._resolve(ph, *maps)
        extras = ev.extra_keys
        if extras is not None and len(extras) != n:
            extras = None
        lora = (ev.lora_name,) if ev.lora_name else None
        found: list[tuple[int, int, int]] = []
        missing = 0
        for i, h in enumerate(hashes):
            k = self._resolve(h, *maps)
            if k is None and have and parent is not None:
                extra = extras[i] if extras is not None else lora
                k = kvblock.key(parent, toks[i * bs : (i + 1) * bs], extra)
            if k is None:
                missing += 1
                parent = None
                continue
            found.append((h, k, _UNKNOWN if parent is None else parent))
            parent = k
        stamps = self._stamps[pool]
        now = time.monotonic()
        for h, k, pk in reversed(found):  # children first: parents end up fresher in LRU order
            self._link(holder, h, k, tid, pk)
            stamps[h] = now
            stamps.move_to_end(h)
        self.stats.storage_stored += len(found)
        if self.storage_max_blocks:
            self._expire(pool, lambda _t: len(stamps) > self.storage_max_blocks)
        return missing

    def _expire(self, pool: str, old: Any) -> None:
        """Drop the pool's oldest storage blocks while ``old(stamp)`` holds."""
        stamps = self._stamps.get(pool)
        holder = self.pods.get(storage_holder(pool))
        if not stamps or holder is None:
            return
        tid = self.tier_id(TIER_SHARED)
        while stamps:
            h, t = next(iter(stamps.items()))
            if not old(t):
                break
            del stamps[h]
            if h in holder.masks:
                self._remove(holder, h, tid)
                self.stats.storage_expired += 1

    def expire_storage(self, now: float | None = None) -> None:
        """Age out pool storage blocks stored (or last reported) over ``storage_ttl_s`` ago."""
        if not self.storage_ttl_s:
            return
        cutoff = (time.monotonic() if now is None else now) - self.storage_ttl_s
        for pool in list(self._stamps):
            self._expire(pool, lambda t: t < cutoff)

    def storage_pools(self) -> list[str]:
        """Pools with a shared-storage holder."""
        return list(self._stamps)

    def storage_blocks(self, pool: str) -> int:
        """Blocks the index holds for ``pool``'s shared storage."""
        h = self.pods.get(storage_holder(pool))
        return 0 if h is None else len(h.keys)

    def _link(self, p: PodBlocks, h: int, k: int, tid: int, parent: int = _UNKNOWN) -> None:
        """Store, then key whatever waited for this block as its parent."""
        self._store(p, h, k, tid, parent)
        if p.orphans and h in p.orphans:
            self._release(p, h, k)

    def _store(self, p: PodBlocks, h: int, k: int, tid: int, parent: int = _UNKNOWN) -> None:
        tb = 1 << tid
        old = p.keys.get(h)
        if old is None:
            p.keys[h] = k
            p.masks[h] = tb
            if p.retired:
                p.retired.pop(h, None)
            if p.orphan_parent and h in p.orphan_parent:
                self._unpark(p, h)
        elif old != k:  # the hash now stands for other content: the newer wins
            self._unlink(p, h, old)
            p.keys[h] = k
            p.masks[h] = tb
        else:
            p.masks[h] |= tb
        bit = p.bit
        held = self._held
        m = held.get(k)
        if m is None:
            held[k] = bit
            p.rev[k] = h
            self.entries += 1
            self._parent[k] = parent
            self._gain(p, k, parent)
        else:
            held.move_to_end(k)
            if not m & bit:
                held[k] = m | bit
                p.rev[k] = h
                self.entries += 1
                # The parent recorded when the key came: every pod's count reads the same one
                # (an unknown parent stays unknown while the key is held).
                self._gain(p, k, self._parent.get(k, _UNKNOWN))
            elif p.rev.get(k) != h:
                return  # two engine hashes for one key: the first one's entry speaks for both
        td = self._tiers[tid]
        td[k] = td.get(k, 0) | bit

    def _gain(self, p: PodBlocks, k: int, parent: int) -> None:
        """Count the pod's new key ``k`` in its holes: a hole itself unless the pod holds its
        parent (or it is a first block); its children the pod holds are holes no more."""
        if parent == _UNKNOWN:
            p.holes += 1
        else:
            if parent not in self._roots and not self._held.get(parent, 0) & p.bit:
                p.holes += 1
            p.kids[parent] = p.kids.get(parent, 0) + 1
        if p.kids:
            p.holes -= p.kids.get(k, 0)

    def _lose(self, p: PodBlocks, k: int) -> None:
        """The inverse of :meth:`_gain`, for a key the pod no longer holds (its parent entry
        still there)."""
        parent = self._parent.get(k, _UNKNOWN)
        if parent == _UNKNOWN:
            p.holes -= 1
        else:
            if parent not in self._roots and not self._held.get(parent, 0) & p.bit:
                p.holes -= 1
            c = p.kids[parent] - 1
            if c:
                p.kids[parent] = c
            else:
                del p.kids[parent]
        if p.kids:
            p.holes += p.kids.get(k, 0)

    def _unlink(self, p: PodBlocks, h: int, k: int) -> None:
        """Take the pod off key ``k`` (if engine hash ``h`` is what put it there)."""
        if p.rev.get(k) != h:
            return
        del p.rev[k]
        off = ~p.bit
        m = self._held[k] & off
        if m:
            self._held[k] = m
            self._lose(p, k)
        else:
            del self._held[k]
            self._lose(p, k)
            del self._parent[k]
        for td in self._tiers:
            v = td.get(k)
            if v is not None:
                v &= off
                if v:
                    td[k] = v
                else:
                    del td[k]
        self.entries -= 1

    def _remove(self, p: PodBlocks, h: int, tid: int) -> None:
        tb = 1 << tid
        mask = p.masks.get(h)
        if mask is None:
            if p.orphan_parent and h in p.orphan_parent:
                o = p.orphans[p.orphan_parent[h]][h]
                o[2] &= ~tb
                if not o[2]:
                    self._unpark(p, h)
            return
        if not mask & tb:
            return
        mask &= ~tb
        k = p.keys[h]
        if mask:
            p.masks[h] = mask
            if p.rev.get(k) == h:
                td = self._tiers[tid]
                v = td.get(k, 0) & ~p.bit
                if v:
                    td[k] = v
                else:
                    td.pop(k, None)
            return
        del p.masks[h]
        del p.keys[h]
        self._unlink(p, h, k)
        self._retire(p, h, k)

    def _clear_tier(self, p: PodBlocks, tid: int) -> None:
        tb = 1 << tid
        for h in [h for h, m in p.masks.items() if m & tb]:
            self._remove(p, h, tid)
        for h in [h for h in p.orphan_parent if p.orphans[p.orphan_parent[h]][h][2] & tb]:
            self._remove(p, h, tid)

    def _forget(self, p: PodBlocks) -> None:
        for h, k in p.keys.items():
            self._unlink(p, h, k)
        p.keys = {}
        p.masks = {}
        p.rev = {}
        p.kids = {}  # empty by now: a pod holding nothing has no holes
        p.holes = 0
        p.orphans.clear()
        p.orphan_parent.clear()

    def _retire(self, p: PodBlocks, h: int, k: int) -> None:
        if self.retired_per_pod:
            p.retired[h] = k
            if len(p.retired) > self.retired_per_pod:
                p.retired.popitem(last=False)

    # ------------------------------------------------------------------ orphans

    def _park(self, p: PodBlocks, parent: int, h: int, toks: list[int], extra: Any,
              tb: int) -> None:
        if not self.orphans_per_pod or h in p.keys:
            return
        old = p.orphan_parent.get(h)
        if old is not None:
            p.orphans[old][h][2] |= tb
            return
        p.orphan_parent[h] = parent
        p.orphans.setdefault(parent, {})[h] = [toks, extra, tb]
        if len(p.orphan_parent) > self.orphans_per_pod:
            self._unpark(p, next(iter(p.orphan_parent)))

    def _unpark(self, p: PodBlocks, h: int) -> list[Any]:
        parent = p.orphan_parent.pop(h)
        waiting = p.orphans[parent]
        o = waiting.pop(h)
        if not waiting:
            del p.orphans[parent]
        return o

    def _release(self, p: PodBlocks, h: int, k: int) -> None:
        """Key every block that waited (directly or down a chain) for block ``h``."""
        stack = [(h, k)]
        while stack:
            ph, pk = stack.pop()
            waiting = p.orphans.pop(ph, None)
            if not waiting:
                continue
            for oh, (toks, extra, tmask) in waiting.items():
                del p.orphan_parent[oh]
                ok = kvblock.key(pk, toks, extra)
                tid = 0
                while tmask:
                    if tmask & 1:
                        self._store(p, oh, ok, tid, pk)
                    tmask >>= 1
                    tid += 1
                stack.append((oh, ok))

    # ------------------------------------------------------------------ snapshots

    def replace(self, name: str, model: str, blocks: Iterable[SnapshotBlock],
                pool: str | None = None) -> int:
        """Replace a pod's blocks by a snapshot's (parents first); return the blocks not keyed.

        The pod's previous map still resolves parents and tokenless blocks the snapshot names.
        With ``pool``, blocks in shared storage are added to the pool's (which keeps what other
        pods wrote): a snapshot replaces only what the pod itself holds.
        """
        if pool:
            self.set_pool(name, pool)
        p = self.pod(name)
        old = p.keys
        self._forget(p)
        if model != p.model:
            old = {}
            p.retired.clear()
            p.model = model
        seed = self.seed(model)
        cur = p.keys
        retired = p.retired
        missing = 0
        holder = self._holder(pool, model) if pool else None
        shared = self.tier_id(TIER_SHARED)
        now = time.monotonic()
        for b in blocks:
            if not b.tiers:
                continue
            h = b.block_hash
            ph = b.parent_hash
            # No parent hash: a first block, when it comes with its tokens (a tokenless one
            # may be an offload whose parent the agent never learnt).
            parent: int | None = seed if b.token_ids else None
            if ph is not None:
                parent = cur.get(ph)
                if parent is None:
                    parent = old.get(ph)
                if parent is None:
                    parent = retired.get(ph)
                if parent is None and holder is not None:
                    parent = holder.keys.get(ph)
            k = cur.get(h)
            if k is None:
                k = old.get(h)
            if k is None and b.token_ids:
                extra = getattr(b, "extra_keys", None)  # newer agents send the block's own
                if extra is None and b.lora_name:
                    extra = (b.lora_name,)
                if parent is None:  # (ph is set: a tokened block without one has the seed)
                    for t in b.tiers:
                        self._park(p, ph, h, b.token_ids, extra, 1 << self.tier_id(t))  # type: ignore[arg-type]
                    missing += 1
                    continue
                k = kvblock.key(parent, b.token_ids, extra)
            elif k is None:
                k = retired.get(h)
                if k is None and holder is not None:
                    k = self._resolve(h, holder.keys, holder.retired)
                if k is None:
                    missing += 1
                    continue
            for t in b.tiers:
                tid = self.tier_id(t)
                pk = _UNKNOWN if parent is None else parent
                if holder is not None and tid == shared:
                    self._link(holder, h, k, tid, pk)
                    stamps = self._stamps[pool]  # type: ignore[index]
                    stamps[h] = now
                    stamps.move_to_end(h)
                else:
                    self._link(p, h, k, tid, pk)
        self.stats.unkeyable += missing
        self._evict()
        return missing

    # ------------------------------------------------------------------ bounded memory

    def _evict(self) -> None:
        held = self._held
        if self.entries <= self.max_blocks:
            return
        tiers = self._tiers
        slots = self._slots
        while self.entries > self.max_blocks and held:
            k, m = held.popitem(last=False)
            for td in tiers:
                td.pop(k, None)
            n = m.bit_count()
            while m:
                low = m & -m
                m ^= low
                p = slots[low.bit_length() - 1]
                self._lose(p, k)
                h = p.rev.pop(k, None)
                if h is not None and p.keys.get(h) == k:
                    del p.keys[h]
                    del p.masks[h]
                    self._retire(p, h, k)
            self._parent.pop(k, None)
            self.entries -= n
            self.stats.evictions += n

    # ------------------------------------------------------------------ lookups

    def _walk(self, keys: Sequence[int], want: int
              ) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
        """The prefix walk of :meth:`lookup`: ``(ends, marks)``, where ``ends`` lists (pods that
        stopped matching, blocks they matched) and ``marks`` (block, pods holding it off-GPU,
        key) for blocks some still-matching pod holds off the GPU.

        The dictionary reads and the running AND of the pod masks run in C (``map``,
        ``accumulate``), a slice at a time until no pod is left; the masks only shrink, so each
        change (at most one per pod) is found by bisection on the popcount.
        """
        ends: list[tuple[int, int]] = []
        marks: list[tuple[int, int, int]] = []
        if not want or not keys:
            return ends, marks
        get = self._held.get
        active = want
        i = 0  # blocks matched so far
        if active < 0:  # every pod: those holding the first block
            active = get(keys[0], 0)
            i = 1 if active else 0
        n = len(keys)
        closed = 0
        for p in self._slots.values():
            if not p.holes:
                closed |= p.bit
        closed &= active
        if closed:
            self._bisect(keys, closed, i, ends)
            active &= ~closed
        reads = i
        step = 256
        while i < n and active:
            part = keys[i : i + step]
            acc = list(accumulate(map(get, part, repeat(0, len(part))), and_, initial=active))
            # acc[t]: the pods holding every block so far, after the part's first t blocks.
            j, last = 0, len(acc) - 1
            while acc[j] != acc[last]:
                # Where the next pods drop out: the first mask after j with fewer bits.
                k = bisect_right(acc, -acc[j].bit_count(), j + 1, last + 1, key=_neg_bits)
                if i + k - 1:  # those pods matched the i + k - 1 blocks before
                    ends.append((acc[j] & ~acc[k], i + k - 1))
                j = k
            active = acc[last]
            i += len(part)
            reads += len(part)
            step *= 2
        self.stats.lookup_reads += reads
        if active and i:
            ends.append((active, i))
        if any(self._tiers[1:]):  # some block is held off the GPU somewhere
            on_gpu = self._tiers[0].get
            holders = want
            for b in range(max((m for _, m in ends), default=0)):
                k = keys[b]
                holders &= get(k, 0)
                off_gpu = holders & ~on_gpu(k, 0)
                if off_gpu:
                    marks.append((b, off_gpu, k))
        return ends, marks

    def _bisect(self, keys: Sequence[int], pods: int, start: int,
                ends: list[tuple[int, int]]) -> None:
        """The walk for pods without holes (``pods``, known to hold ``keys[:start]``): each
        holds a prefix of the keys and none after it, so where each stops is found by bisection.
        Appends (pods, blocks matched) to ``ends`` for the pods that match any."""
        get = self._held.get
        n = len(keys)
        lo = start
        reads = 0
        while pods:
            # The first block from lo on that some of the pods lack.
            hi = n
            while lo < hi:
                mid = (lo + hi) // 2
                reads += 1
                if get(keys[mid], 0) & pods == pods:
                    lo = mid + 1
                else:
                    hi = mid
            if lo == n:
                if n:
                    ends.append((pods, n))
                break
            reads += 1
            stay = get(keys[lo], 0) & pods
            if lo:
                ends.append((pods & ~stay, lo))
            pods = stay
            lo += 1
        self.stats.lookup_reads += reads

    def _credit_storage(self, lengths: dict[int, int], tiers: dict[int, list[str]],
                        pods: Sequence[str] | None) -> None:
        """Extend each pod's match by its pool's shared-storage run past it (those blocks load
        from storage), then drop the pools' own entries from the answer."""
        gpu = self._tier_names[0]
        for slot in [s for s in lengths if self._slots[s].name.startswith(STORAGE_PREFIX)]:
            run = lengths.pop(slot)
            tiers.pop(slot, None)
            pool = self._slots[slot].name[len(STORAGE_PREFIX):]
            names = pods if pods is not None else list(self.pool_of)
            for name in names:
                if self.pool_of.get(name) != pool:
                    continue
                q = self.pods.get(name)
                if q is None:
                    continue
                own = lengths.get(q.slot, 0)
                if run > own:
                    row = tiers.get(q.slot) or [gpu] * own
                    row.extend([TIER_SHARED] * (run - own))
                    tiers[q.slot] = row
                    lengths[q.slot] = run

    def lookup(self, keys: Sequence[int], pods: Sequence[str] | None = None) -> list[PodMatch]:
        """Each pod's longest run of held blocks from the prompt's start, with the best tiers.

        With ``pods``, exactly those pods are answered (0 blocks for those holding none, in the
        order asked); without, every pod holding the first block, longest match first. The walk
        keeps the set of pods still matching as a bit mask and stops when it is empty. A pod's
        match includes its pool's shared storage (tier ``SHARED_STORAGE``) past its own blocks.
        """
        self.stats.lookups += 1
        if pods is not None:
            want = 0
            for name in pods:
                p = self.pods.get(name)
                if p is not None:
                    want |= p.bit
            if self._stamps:  # the pools' shared storage counts for every pod of the pool
                for name in pods:
                    pool = self.pool_of.get(name)
                    if pool is not None:
                        hp = self.pods.get(STORAGE_PREFIX + pool)
                        if hp is not None:
                            want |= hp.bit
        else:
            want = -1  # every pod: narrowed to the first block's holders
        ends, marks = self._walk(keys, want)
        lengths: dict[int, int] = {}
        for mask, n in ends:
            while mask:
                low = mask & -mask
                lengths[low.bit_length() - 1] = n
                mask ^= low
        # Per-block tiers only for pods holding some matched block off-GPU; an empty list means
        # "all on GPU" and keeps the common reply small.
        gpu = self._tier_names[0]
        tiers: dict[int, list[str]] = {}
        lower = list(zip(self._tier_names[1:], self._tiers[1:], strict=True))
        for i, mask, k in marks:
            while mask:
                low = mask & -mask
                mask ^= low
                slot = low.bit_length() - 1
                for name, td in lower:
                    if td.get(k, 0) & low:
                        row = tiers.get(slot)
                        if row is None:
                            row = tiers[slot] = [gpu] * lengths[slot]
                        row[i] = name
                        break
        if self._stamps and lengths:
            self._credit_storage(lengths, tiers, pods)
        if lengths and len(self._held) * 2 > self.max_blocks:
            # Matched keys are in use: keep them, parents freshest (touched last). Only once
            # the index is half full (touching a 100k-token prompt's keys costs more than the
            # walk): below that, no eviction is near and insertion order is close enough.
            deque(map(self._held.move_to_end, reversed(keys[: max(lengths.values())])), maxlen=0)
        slots = self._slots
        if pods is not None:
            out = []
            seen = set()
            for name in pods:
                if name in seen:
                    continue
                seen.add(name)
                p = self.pods.get(name)
                if p is not None and p.slot in lengths:
                    out.append(PodMatch(pod=name, blocks=lengths[p.slot],
                                        tiers=tiers.get(p.slot, [])))
                else:
                    out.append(PodMatch(pod=name, blocks=0))
            return out
        ranked = sorted(lengths.items(), key=lambda sn: (-sn[1], slots[sn[0]].name))
        return [PodMatch(pod=slots[s].name, blocks=n, tiers=tiers.get(s, [])) for s, n in ranked]
