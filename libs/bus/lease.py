"""A leader lease in a NATS JetStream key-value bucket: of the replicas that step the same
:class:`Lease` (same bucket and key), at most one holds it at a time.

The holder writes its name under the key and renews it every :meth:`Lease.step` with a
compare-and-set on the revision it last wrote; another replica that sees the key's revision
unchanged for ``ttl_s`` takes it over with a compare-and-set on that revision, so of two
candidates only one wins. A holder that cannot renew (the bus is gone, JetStream does not
answer) stops calling itself leader ``ttl_s`` after its last renewal, before anyone else can
take over (which needs ``ttl_s`` of an unchanged key *after* that renewal). A holder that stops
cleanly deletes the key, and the next candidate takes it at its next step.

Time is the caller's (monotonic seconds), so the rules are tested without waiting.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.errors import (
    Error as JetStreamError,
)
from nats.js.kv import KeyValue

from infermesh.libs.telemetry import get_logger

log = get_logger("bus.lease")


@dataclass
class LeaseState:
    """What a replica knows of the lease after a step."""

    leader: bool = False
    holder: str = ""  # who held the key when last read ("" unknown or none)
    revision: int = 0  # the key's revision last read or written
    seen_at: float = float("-inf")  # when that revision was first seen (followers)
    renewed_at: float = float("-inf")  # our last successful write (leader)
    error: str = ""  # the last step's failure ("" none)


class Lease:
    """One replica's side of the lease ``bucket``/``key``, held under the name ``holder``."""

    def __init__(self, nc: Client, bucket: str, key: str, holder: str, *, ttl_s: float = 3.0,
                 replicas: int = 1, timeout_s: float = 1.0) -> None:
        if ttl_s <= 0:
            raise ValueError("the lease's ttl_s must be positive")
        self.nc = nc
        self.bucket = bucket
        self.key = key
        self.holder = holder
        self.ttl_s = ttl_s
        self.replicas = replicas
        self.timeout_s = timeout_s
        self.state = LeaseState()
        self._kv: KeyValue | None = None

    def is_leader(self, now: float) -> bool:
        """Whether this replica holds the lease now: taken or renewed less than ``ttl_s`` ago."""
        st = self.state
        return st.leader and now - st.renewed_at < self.ttl_s

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            js = self.nc.jetstream(timeout=self.timeout_s)
            try:
                self._kv = await js.key_value(self.bucket)
            except BucketNotFoundError:
                # A lease needs no history and no disk: one value per key, in memory. Two
                # replicas creating it at once both succeed (same config).
                self._kv = await js.create_key_value(KeyValueConfig(
                    bucket=self.bucket, history=1, storage=StorageType.MEMORY,
                    replicas=self.replicas,
                    description="infermesh leader leases (libs/bus/lease.py)"))
        return self._kv

    async def step(self, now: float) -> bool:
        """Renew, take or watch the lease once; whether this replica is the leader after it."""
        st = self.state
        was = self.is_leader(now)
        try:
            kv = await self._bucket()
            if st.leader:
                await self._renew(kv, now)
            else:
                await self._watch(kv, now)
            if st.error:
                log.info("lease_available", bucket=self.bucket, holder=self.holder)
            st.error = ""
        except (JetStreamError, NatsError, TimeoutError) as e:
            # No answer: a leader keeps its claim until ttl_s after its last renewal.
            error = f"{type(e).__name__}: {e}"
            if error != st.error:  # once per new kind of failure, not every step
                log.warning("lease_unavailable", bucket=self.bucket, holder=self.holder,
                            error=error, hint="is JetStream enabled on this NATS? "
                            "(nats-server -js); one replica may run without the lease")
            st.error = error
            self._kv = None  # look the bucket up again (a restarted server may have none)
        st.leader = self.is_leader(now)
        if st.leader != was:
            log.info("lease_acquired" if st.leader else "lease_lost", bucket=self.bucket,
                     key=self.key, holder=self.holder, revision=st.revision,
                     error=st.error or None)
        return st.leader

    async def _renew(self, kv: KeyValue, now: float) -> None:
        st = self.state
        try:
            st.revision = await kv.update(self.key, self.holder.encode(), last=st.revision)
        except KeyWrongLastSequenceError:
            st.leader = False  # someone took it over: we were cut off for ttl_s or more
            st.renewed_at = float("-inf")
            st.holder, st.seen_at = "", now
            return
        st.renewed_at = now
        st.holder = self.holder

    async def _watch(self, kv: KeyValue, now: float) -> None:
        st = self.state
        try:
            entry = await kv.get(self.key)
        except KeyNotFoundError:  # none yet, or deleted by a holder that stopped
            await self._take(kv, now, None)
            return
        holder = (entry.value or b"").decode(errors="replace")
        revision = entry.revision or 0
        if revision != st.revision or holder != st.holder:
            st.revision, st.holder, st.seen_at = revision, holder, now
        if holder == self.holder or now - st.seen_at >= self.ttl_s:
            # Ours (from before a restart of this replica's lease), or not renewed for ttl_s.
            await self._take(kv, now, revision)

    async def _take(self, kv: KeyValue, now: float, last: int | None) -> None:
        st = self.state
        try:
            if last is None:
                st.revision = await kv.create(self.key, self.holder.encode())
            else:
                st.revision = await kv.update(self.key, self.holder.encode(), last=last)
        except KeyWrongLastSequenceError:
            return  # another candidate was first: follow it from the next read
        st.leader, st.renewed_at, st.holder, st.seen_at = True, now, self.holder, now

    async def release(self) -> None:
        """Give the lease up at once (a clean stop): the next candidate need not wait."""
        st = self.state
        if not st.leader or self._kv is None:
            st.leader = False
            return
        st.leader = False
        with contextlib.suppress(JetStreamError, NatsError, TimeoutError):
            await self._kv.delete(self.key, last=st.revision)
            log.info("lease_released", bucket=self.bucket, key=self.key, holder=self.holder)
