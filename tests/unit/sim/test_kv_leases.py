"""The prefill side's leases: held blocks are released once, by the read or by expiry;
heartbeats move the deadline and the timer follows it; nothing polls."""

from __future__ import annotations

import asyncio

from infermesh.services.sim.cache import Allocation
from infermesh.services.sim.kv_leases import LeaseTable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def table(lease_s: float = 30.0, clock: Clock | None = None
          ) -> tuple[LeaseTable, list[Allocation], list[str]]:
    released: list[Allocation] = []
    expired: list[str] = []
    kw = {"clock": clock} if clock is not None else {}
    return LeaseTable(lease_s, released.append, expired.append, **kw), released, expired


async def test_a_read_ends_the_lease_and_its_timer() -> None:
    t, released, expired = table()
    a = Allocation()
    lease = t.hold("r1", a, [1, 2], 20)
    assert "r1" in t and len(t) == 1 and lease.timer is not None
    got = t.take("r1")
    assert got is lease and lease.timer is None and "r1" not in t
    assert t.take("r1") is None  # a second read finds nothing
    assert released == [] and expired == []  # the caller releases what it took


async def test_an_unread_lease_expires_once_and_frees_its_blocks() -> None:
    t, released, expired = table(lease_s=0.02)
    a = Allocation()
    t.hold("r1", a, [1], 8)
    for _ in range(200):
        if expired:
            break
        await asyncio.sleep(0.01)
    assert expired == ["r1"] and released == [a] and len(t) == 0
    assert t.take("r1") is None


async def test_a_heartbeat_moves_the_deadline_and_the_timer_follows() -> None:
    clock = Clock()
    t, released, expired = table(lease_s=30.0, clock=clock)
    a = Allocation()
    lease = t.hold("r1", a, [1], 8)
    assert lease.deadline == 130.0
    clock.now = 125.0
    assert t.extend(["r1", "unknown"]) == 1
    assert lease.deadline == 145.0  # two thirds of a lease from the heartbeat
    clock.now = 131.0
    t._fire(lease)  # the first timer fires: the deadline moved, so it re-arms
    assert released == [] and lease.timer is not None
    clock.now = 120.0
    t.extend(["r1"])
    assert lease.deadline == 145.0  # never shortened
    clock.now = 146.0
    t._fire(lease)
    assert released == [a] and expired == ["r1"] and "r1" not in t


async def test_reusing_a_request_id_frees_the_older_blocks() -> None:
    t, released, _ = table()
    a, b = Allocation(), Allocation()
    t.hold("r1", a, [1], 8)
    t.hold("r1", b, [2], 8)
    assert released == [a] and len(t) == 1
    t.release_all()
    assert released == [a, b] and len(t) == 0
