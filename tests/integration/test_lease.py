"""The leader lease (libs/bus/lease.py) on a real nats-server with JetStream: at most one
holder, renewal, takeover after the TTL by compare-and-set, loss detected by the old holder,
release, a race of candidates, and a server restarted without the bucket. Time is passed in,
so the TTL rules are checked without waiting for them."""

from __future__ import annotations

import asyncio
from typing import Any

from infermesh.libs.bus import NatsServer, connect
from infermesh.libs.bus.lease import Lease

TTL = 3.0


async def _pair(url: str) -> tuple[Any, Any, Lease, Lease]:
    a_nc = await connect(url, "lease-a")
    b_nc = await connect(url, "lease-b")
    return (a_nc, b_nc, Lease(a_nc, "t_lease", "leader", "a", ttl_s=TTL),
            Lease(b_nc, "t_lease", "leader", "b", ttl_s=TTL))


async def test_one_holder_renewal_takeover_and_release(nats_server: NatsServer) -> None:
    a_nc, b_nc, a, b = await _pair(nats_server.url)
    try:
        assert await a.step(0.0) is True  # the first candidate takes it
        assert await b.step(0.1) is False and b.state.holder == "a"
        # While a renews, b never takes it, however long it watches.
        for t in range(1, 10):
            assert await a.step(float(t)) is True
            assert await b.step(t + 0.5) is False
        # a stops renewing (hung, cut off): b takes over once the key is unchanged for TTL.
        assert await b.step(11.0) is False  # unchanged for 1.5 s only
        assert not a.is_leader(9.0 + TTL)  # a no longer calls itself leader after TTL...
        assert await b.step(9.5 + TTL) is True  # ...and b takes over only after that
        # a comes back and tries to renew: the compare-and-set fails, a follows b.
        assert await a.step(13.0) is False and a.state.holder == ""
        assert await a.step(13.1) is False and a.state.holder == "b"
        # b releases (a clean stop): a takes it at its next step, no TTL to wait.
        await b.release()
        assert await a.step(13.2) is True
    finally:
        await a_nc.close()
        await b_nc.close()


async def test_racing_candidates_one_wins(nats_server: NatsServer) -> None:
    ncs = [await connect(nats_server.url, f"lease-{i}") for i in range(5)]
    try:
        leases = [Lease(nc, "t_race", "leader", f"c{i}", ttl_s=TTL) for i, nc in enumerate(ncs)]
        won = await asyncio.gather(*(lease.step(0.0) for lease in leases))
        assert sum(won) == 1
        # A stale key: all race for the takeover after TTL; still one winner.
        for lease in leases:
            if not lease.state.leader:
                await lease.step(1.0)
        won = await asyncio.gather(*(lease.step(1.0 + TTL) for lease in leases
                                     if not lease.state.leader))
        assert sum(won) == 1
    finally:
        for nc in ncs:
            await nc.close()


async def test_server_gone_and_back_without_the_bucket(tmp_path: Any) -> None:
    """The lease bucket lives in memory: a restarted server has none. The holder keeps its
    claim for TTL while the bus is gone, then drops it; once the server is back the bucket is
    created again and the lease taken."""
    srv = NatsServer(work_dir=tmp_path / "nats").start()
    nc = await connect(srv.url, "lease-a")
    try:
        a = Lease(nc, "t_gone", "leader", "a", ttl_s=TTL, timeout_s=0.3)
        assert await a.step(0.0) is True
        srv.kill()
        assert await a.step(1.0) is True and a.state.error  # no answer, still within TTL
        assert await a.step(TTL + 0.1) is False  # no renewal for TTL: no longer the leader
        srv.start()
        await nc.flush(timeout=10)  # reconnected
        for _ in range(50):  # JetStream answers a moment after the server is healthy
            if await a.step(10.0):
                break
            await asyncio.sleep(0.1)
        assert a.state.leader and not a.state.error
    finally:
        await nc.close()
        srv.stop()


async def test_without_jetstream_no_leader_and_a_clear_error(tmp_path: Any) -> None:
    """A NATS without JetStream: nobody can hold the lease, so nobody acts — and the step says
    why (the autoscaler's /health shows it; `--no-lease` runs a single replica there)."""
    srv = NatsServer(work_dir=tmp_path / "nats", jetstream=False).start()
    nc = await connect(srv.url, "lease-a")
    try:
        a = Lease(nc, "t_nojs", "leader", "a", ttl_s=TTL, timeout_s=0.3)
        assert await a.step(0.0) is False
        assert a.state.error and not a.is_leader(0.0)
    finally:
        await nc.close()
        srv.stop()
