"""The prefill side of a disaggregated request: blocks held for a remote decode, on a lease.

As vLLM's NIXL connector does, a finished prefill's blocks stay referenced (not evictable,
counted in KV usage) until the decode engine reads them or the lease runs out; a heartbeat
from the decode engine pushes the deadline to two thirds of a lease ahead (vLLM's
``_lease_extension``). Expiry is a timer per lease, re-armed when a heartbeat moved the
deadline, so nothing polls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .cache import Allocation

__all__ = ["Lease", "LeaseTable"]


@dataclass(eq=False)
class Lease:
    """One finished prefill's blocks, held for its decode."""

    request_id: str
    alloc: Allocation
    block_ids: list[int]
    num_tokens: int
    deadline: float
    timer: asyncio.TimerHandle | None = None


class LeaseTable:
    """Leases by request id; ``release(alloc)`` frees blocks, ``on_expired(id)`` counts one."""

    def __init__(self, lease_s: float, release: Callable[[Allocation], None],
                 on_expired: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_s = lease_s
        self.extension_s = lease_s * 2 / 3
        self._release = release
        self._on_expired = on_expired
        self._clock = clock
        self._leases: dict[str, Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._leases

    def hold(self, request_id: str, alloc: Allocation, block_ids: list[int],
             num_tokens: int) -> Lease:
        """Keep ``alloc`` for one lease (call from the event loop)."""
        old = self._leases.pop(request_id, None)
        if old is not None:  # a reused request id: the older blocks go
            self._drop(old)
        lease = Lease(request_id, alloc, block_ids, num_tokens, self._clock() + self.lease_s)
        self._leases[request_id] = lease
        self._arm(lease)
        return lease

    def extend(self, request_ids: Iterable[str]) -> int:
        """A heartbeat: leases still held run at least two thirds of a lease from now."""
        n = 0
        deadline = self._clock() + self.extension_s
        for rid in request_ids:
            lease = self._leases.get(rid)
            if lease is not None:
                lease.deadline = max(lease.deadline, deadline)
                n += 1
        return n

    def take(self, request_id: str) -> Lease | None:
        """The decode read the blocks: end the lease (the caller releases ``alloc``)."""
        lease = self._leases.pop(request_id, None)
        if lease is not None and lease.timer is not None:
            lease.timer.cancel()
            lease.timer = None
        return lease

    def release_all(self) -> None:
        """Free every held block (the engine stops)."""
        for lease in list(self._leases.values()):
            self._leases.pop(lease.request_id, None)
            self._drop(lease)

    def _drop(self, lease: Lease) -> None:
        if lease.timer is not None:
            lease.timer.cancel()
            lease.timer = None
        self._release(lease.alloc)

    def _arm(self, lease: Lease) -> None:
        delay = max(0.0, lease.deadline - self._clock())
        lease.timer = asyncio.get_running_loop().call_later(delay, self._fire, lease)

    def _fire(self, lease: Lease) -> None:
        lease.timer = None
        if self._leases.get(lease.request_id) is not lease:
            return
        if lease.deadline > self._clock():
            self._arm(lease)  # a heartbeat moved it
            return
        del self._leases[lease.request_id]
        self._release(lease.alloc)
        self._on_expired(lease.request_id)
