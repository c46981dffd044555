"""Helpers for integration tests: bus collectors, HTTP calls, waiting on conditions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import zmq
import zmq.asyncio

from infermesh.libs.bus import settle
from infermesh.libs.config import default_of
from infermesh.libs.process.runfile import RunFile, read_run_file
from infermesh.proto import codec
from infermesh.proto.messages import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    PodState,
)
from infermesh.services.sim.config import SimConfig

# The simulator's KV block size when a test does not set one.
SIM_BLOCK_SIZE: int = default_of(SimConfig, "block_size")


async def wait_until(cond: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0,
                     what: str = "condition", interval: float = 0.05) -> None:
    """Poll ``cond`` until it holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        ok = cond()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


class KVStreamView:
    """What a consumer of one pod's bus stream knows: the block set per tier, seqs, epochs."""

    def __init__(self) -> None:
        self.batches: list[KVEventBatch] = []
        self.gpu: set[int] = set()
        self.cpu: set[int] = set()
        self.cleared = 0
        self.events = 0
        self.block_events = 0

    def apply(self, b: KVEventBatch) -> None:
        self.batches.append(b)
        for ev in b.events:
            self.events += 1
            tier = self.cpu if getattr(ev, "tier", "GPU") == "CPU" else self.gpu
            if isinstance(ev, BlockStored):
                tier.update(ev.block_hashes)
                self.block_events += len(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                tier.difference_update(ev.block_hashes)
                self.block_events += len(ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                self.cleared += 1
                self.gpu.clear()
                self.cpu.clear()

    def epochs(self) -> list[str]:
        out: list[str] = []
        for b in self.batches:
            if not out or out[-1] != b.epoch:
                out.append(b.epoch)
        return out

    def seqs(self, epoch: str) -> list[int]:
        return [b.seq for b in self.batches if b.epoch == epoch]


class BusWatcher:
    """Subscribes to KV streams and heartbeats and keeps a view per pod."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.kv: dict[str, KVStreamView] = {}
        self.states: dict[str, PodState] = {}
        self.bad = 0

    async def start(self) -> BusWatcher:
        await self.nc.subscribe("im.kv.*.*", cb=self._on_kv)
        await self.nc.subscribe("im.pod.*.*", cb=self._on_pod)
        await settle(self.nc)
        return self

    async def _on_kv(self, msg: Any) -> None:
        try:
            b = codec.decode(msg.data, KVEventBatch)
        except codec.DecodeError:
            self.bad += 1
            return
        self.kv.setdefault(b.pod, KVStreamView()).apply(b)

    async def _on_pod(self, msg: Any) -> None:
        try:
            st = codec.decode(msg.data, PodState)
        except codec.DecodeError:
            self.bad += 1
            return
        self.states[st.pod] = st

    def view(self, pod: str) -> KVStreamView:
        return self.kv.setdefault(pod, KVStreamView())


async def sim_cache(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(f"{base}/sim/cache") as r:
        r.raise_for_status()
        return await r.json()  # type: ignore[no-any-return]


async def complete_ids(session: aiohttp.ClientSession, base: str, ids: list[int],
                       max_tokens: int = 1, model: str = "infermesh/tiny-llama") -> dict[str, Any]:
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens}
    async with session.post(f"{base}/v1/completions", json=body) as r:
        data = await r.json()
        assert r.status == 200, data
        return data  # type: ignore[no-any-return]


def random_prompt(rng: random.Random, n: int, vocab: int = 4000) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(n)]


async def zmq_replay(ctx: zmq.asyncio.Context, endpoint: str, start: int = 0,
                     timeout: float = 10.0) -> list[list[bytes]]:
    """Raw replay: every answer message's frames (after the empty delimiter), END included."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    out = []
    try:
        await s.send_multipart([b"", start.to_bytes(8, "big")])
        while True:
            if not await s.poll(int(timeout * 1000)):
                raise AssertionError("replay timed out")
            frames = await s.recv_multipart()
            assert frames[0] == b""
            out.append(frames[1:])
            if frames[-2] == b"\xff" * 8:
                return out
    finally:
        s.close(0)


@contextlib.contextmanager
def infermesh_up(tmp_path: Path, model_dir: Path, args: list[str], timeout: float = 90.0,
                 state: Path | None = None, log_name: str = "up.log",
                 env: dict[str, str] | None = None,
                 ) -> Iterator[tuple[subprocess.Popen[bytes], Path, RunFile]]:
    """Run ``infermesh up --free-ports ARGS`` (state in ``tmp_path/state``) until it prints that
    it is up; yield (process, log path, its run.json). Whatever is still running at the end is
    killed (process group).
    """
    log = tmp_path / log_name
    state = state or tmp_path / "state"
    env = {**os.environ, "INFERMESH_MODEL_DIR": str(model_dir), **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "infermesh.cli", "up", "--free-ports", *args,
             "--state-dir", str(state)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while "infermesh is up" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        run = read_run_file(state)
        assert run is not None and run.pid == proc.pid
        yield proc, log, run
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def wait_healthy(http: aiohttp.ClientSession, proc: Any, port: int, name: str) -> None:
    """Wait until ``proc`` answers 200 on ``/health`` at ``port``; fail at once if it exits."""

    async def up() -> bool:
        if not proc.alive():
            raise AssertionError(f"{name} exited:\n{proc.tail()}")
        try:
            async with http.get(f"http://127.0.0.1:{port}/health") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await wait_until(up, what=f"{name} healthy")


async def services_ready(url: str, *, tokenizer: int = 1, indexer: int = 1, scheduler: int = 1,
                         security: Any = None, timeout: float = 60.0) -> None:
    """Wait until the bus services answer $SRV.PING in these numbers (so a first request does
    not race their start)."""
    from infermesh.libs.bus import connect
    from infermesh.libs.process.ready import wait_bus_services

    nc = await connect(url, "test-watch", security=security)
    try:
        await wait_bus_services(nc, {"infermesh-tokenizer": tokenizer,
                                     "infermesh-indexer": indexer,
                                     "infermesh-scheduler": scheduler}, timeout)
    finally:
        await nc.close()


async def until_adapters(watcher: BusWatcher, pod: str, holds: set[str], lacks: set[str]) -> None:
    """Until ``pod``'s heartbeat says it holds ``holds`` and not ``lacks``, and two more
    heartbeats after that one (the ingress got the same heartbeats: it has seen it too)."""
    seen: list[float] = []

    def ok() -> bool:
        st = watcher.states.get(pod)
        if st is None or not holds <= set(st.lora.loaded) or lacks & set(st.lora.loaded):
            seen.clear()
            return False
        if not seen or seen[-1] != st.ts:
            seen.append(st.ts)
        return len(seen) >= 3

    await wait_until(ok, what=f"{pod} holding {holds} and not {lacks}", interval=0.02)
