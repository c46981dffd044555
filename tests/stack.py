"""The whole system as processes: nats, simulated engines, agents, tokenizer, indexer,
scheduler(s) and the ingress."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from infermesh.libs.bus import BusAuth, NatsServer

from .conftest import Proc, ProcessManager


@dataclass
class Stack:
    nats: NatsServer
    ingress_url: str
    engines: list[dict[str, Any]]
    procs: ProcessManager
    schedulers: list[Proc] = field(default_factory=list)
    indexers: list[Proc] = field(default_factory=list)
    ingress: Proc | None = None

    @property
    def pods(self) -> list[str]:
        return [f"sim-{i}" for i in range(len(self.engines))]


def _health(url: str) -> dict[str, Any] | None:
    import json

    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except OSError:
        return None


def start_stack(procs: ProcessManager, nats: NatsServer, *, engines: int = 4,
                schedulers: int = 1, indexers: int = 1,
                sim_args: tuple[str, ...] = (),
                ingress_args: tuple[str, ...] = (), auth: BusAuth | None = None) -> Stack:
    """Start every process and wait until the ingress sees every engine.

    With ``auth`` (from ``write_bus_auth``; the server must run its config) every process
    connects as its own identity, and the readiness check as the observer.
    """
    from .integration.helpers import free_ports

    def creds(user: str) -> list[str]:
        return ["--nats-credentials", str(auth.credentials_file(user))] if auth else []

    _, info = procs.sim("--time-scale", "0.02", "--hash-seed", "0", *sim_args, engines=engines)
    bus = ["--nats-url", nats.url]
    for i, e in enumerate(info["engines"]):
        procs.agent(nats.url, e, f"sim-{i}", *creds(f"agent-sim-{i}"))
    procs.service("tokenizer", *bus, "--http-port", "-1", *creds("tokenizer"))
    stack = Stack(nats, "", info["engines"], procs)
    for i in range(indexers):
        stack.indexers.append(procs.service("indexer", *bus, "--http-port", "-1",
                                            *creds("indexer"), name=f"indexer-{i}"))
    for i in range(schedulers):
        stack.schedulers.append(procs.service("scheduler", *bus, "--http-port", "-1",
                                              *creds("scheduler"), name=f"scheduler-{i}"))
    port = free_ports(1)
    stack.ingress = procs.service("ingress", *bus, "--port", str(port), *ingress_args,
                                  *creds("ingress"))
    stack.ingress_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        h = _health(stack.ingress_url + "/health")
        if h and h.get("pods") == engines:
            break
        assert stack.ingress.alive(), stack.ingress.tail()
        assert time.monotonic() < deadline, "stack not ready"
        time.sleep(0.05)
    # In a thread: the caller may be an async test with its own running loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run,
                    _wait_bus_services(nats.url, schedulers, indexers, auth)).result()
    return stack


async def _wait_bus_services(url: str, schedulers: int, indexers: int = 1,
                             auth: BusAuth | None = None) -> None:
    """Every bus service answers $SRV.PING (so the first request does not race startup)."""
    import json

    from infermesh.libs.bus import connect

    nc = await connect(url, "stack-watch", security=auth.client("observer") if auth else None)
    want = {"tokenizer": 1, "indexer": indexers, "scheduler": schedulers}
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish("$SRV.PING", b"", reply=inbox)
            seen: dict[str, int] = {}
            try:
                while True:
                    m = await sub.next_msg(timeout=0.2)
                    name = json.loads(m.data).get("name", "")
                    for k in want:
                        if k in name:
                            seen[k] = seen.get(k, 0) + 1
            except Exception:
                pass
            await sub.unsubscribe()
            if all(seen.get(k, 0) >= n for k, n in want.items()):
                return
        raise AssertionError(f"bus services not up: saw {seen}")
    finally:
        await nc.close()


