"""Waiting until processes are ready: a ready file, an HTTP health check, bus services answering
``$SRV.PING``, pods' heartbeats. Each wait fails at once when a watched process exits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from nats.micro.service import ServicePing

from .process import Process

T = TypeVar("T")


class NotReady(RuntimeError):
    """A process exited, or did not get ready in time; the message says which and why."""


class ReadyFile(msgspec.Struct, kw_only=True):
    """What a service writes to ``--ready-file`` once it serves (libs/runtime)."""

    service: str
    pid: int
    started: float
    # Where its HTTP server listens (the ops server, or the API itself), when it has one.
    http_url: str = ""
    # Service-specific: the simulator lists its engines' endpoints here.
    detail: dict[str, Any] = msgspec.field(default_factory=dict)


def write_ready_file(path: str | Path, ready: ReadyFile) -> None:
    """Write ``ready`` to ``path`` atomically (readers never see half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    Path(tmp).write_bytes(msgspec.json.encode(ready))
    os.replace(tmp, path)


def _check_alive(watch: Iterable[Process]) -> None:
    for p in watch:
        if not p.alive():
            raise NotReady(f"{p.name} exited (status {p.returncode}) before it was ready"
                           + (f"; log {p.log}:\n{p.tail(1500)}" if p.log else ""))


def wait_for(cond: Callable[[], T | None], what: str, timeout: float,
             watch: Iterable[Process] = (), interval: float = 0.05) -> T:
    """Poll ``cond`` until it returns something other than None (or False); return it."""
    watch = list(watch)
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got is not None and got is not False:
            return got
        _check_alive(watch)
        if time.monotonic() > deadline:
            raise NotReady(f"{what} not ready within {timeout:g} s")
        time.sleep(interval)


def wait_ready_file(path: str | Path, timeout: float, watch: Iterable[Process] = ()) -> ReadyFile:
    """Wait for ``path`` and decode it as a :class:`ReadyFile`."""
    p = Path(path)

    def read() -> ReadyFile | None:
        try:
            return msgspec.json.decode(p.read_bytes(), type=ReadyFile)
        except (OSError, msgspec.DecodeError):
            return None

    return wait_for(read, f"ready file {p}", timeout, watch)


def http_ok(url: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """GET ``url``: its JSON body (``{}`` when not JSON) on 200, else None."""
    # Our own children on loopback: a self-signed certificate is fine, so it is not verified.
    ctx = ssl._create_unverified_context() if url.startswith("https:") else None  # noqa: S323
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
            if r.status != 200:
                return None
            body = r.read()
    except OSError:
        return None
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def wait_http(url: str, timeout: float, watch: Iterable[Process] = (),
              check: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Wait until ``url`` answers 200 (and ``check(body)`` holds); return the body."""

    def probe() -> dict[str, Any] | None:
        body = http_ok(url)
        if body is None or (check is not None and not check(body)):
            return None
        return body

    return wait_for(probe, url, timeout, watch)


async def bus_services(nc: Any, wait: float = 0.2) -> dict[str, int]:
    """Ping every NATS micro service once; how many instances of each name answered."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    counts: dict[str, int] = {}
    try:
        await nc.publish("$SRV.PING", b"", reply=inbox)
        await nc.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while (left := deadline - loop.time()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except Exception:  # nats-py's TimeoutError: nothing more within the window
                break
            with contextlib.suppress(ValueError, KeyError, TypeError):
                ping = ServicePing.from_dict(json.loads(msg.data))
                counts[ping.name] = counts.get(ping.name, 0) + 1
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return counts


async def wait_bus_services(nc: Any, want: Mapping[str, int], timeout: float,
                            watch: Iterable[Process] = ()) -> dict[str, int]:
    """Wait until at least ``want[name]`` instances of each micro service answer ``$SRV.PING``."""
    watch = list(watch)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen: dict[str, int] = {}
    while True:
        seen = await bus_services(nc)
        if all(seen.get(name, 0) >= n for name, n in want.items()):
            return seen
        _check_alive(watch)
        if loop.time() > deadline:
            missing = {k: f"{seen.get(k, 0)}/{n}" for k, n in want.items() if seen.get(k, 0) < n}
            raise NotReady(f"bus services not ready within {timeout:g} s: {missing}")


async def wait_heartbeats(nc: Any, subject: str, pods: Iterable[str], timeout: float,
                          watch: Iterable[Process] = ()) -> None:
    """Wait until every pod in ``pods`` has sent a heartbeat (PodState) saying it is ready."""
    from infermesh.proto import codec
    from infermesh.proto.messages import PodState

    want = set(pods)
    if not want:
        return  # (a pool that starts at zero)
    seen: set[str] = set()
    done = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        try:
            st = codec.decode(msg.data, PodState)
        except codec.DecodeError:
            return
        if st.ready:
            seen.add(st.pod)
        if want <= seen:
            done.set()

    sub = await nc.subscribe(subject, cb=on_msg)
    watch = list(watch)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while not done.is_set():
            _check_alive(watch)
            if loop.time() > deadline:
                raise NotReady(f"no ready heartbeat within {timeout:g} s from "
                               f"{sorted(want - seen)}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 0.2)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def run_blocking(coro: Any) -> Any:
    """Run a coroutine to completion from sync code, also when an event loop runs in this thread
    (an async test calling a sync helper): then it runs on a fresh loop in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
