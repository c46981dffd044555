"""A whole infermesh on this machine for one benchmark run: started cold, stopped after.

nats-server, one simulator process with N engines, an agent per engine, the tokenizer, indexer,
scheduler and ingress, each a process, as `infermesh up` runs them. Every profile of a benchmark
gets a fresh one, so no profile inherits another's caches, index or routing history.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from infermesh.libs.bus import NatsServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SimSpec:
    """The simulated fleet of one run."""

    engines: int = 4
    num_gpu_blocks: int = 29_000
    block_size: int = 16
    time_scale: float = 1.0
    max_num_seqs: int = 256
    extra: list[str] = field(default_factory=list)


class LocalSystem:
    """Start with :meth:`start`, use :attr:`url`, then :meth:`stop`."""

    def __init__(self, spec: SimSpec, log_dir: Path | None = None) -> None:
        self.spec = spec
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="infermesh-bench-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.nats = NatsServer(max_payload=8 * 1024 * 1024)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.url = ""

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        p = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=log,
                             stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()
        self.procs.append(p)
        return p

    def start(self, timeout: float = 120.0) -> LocalSystem:
        """Start everything; return once the ingress sees every engine and services answer."""
        s = self.spec
        self.nats.start()
        ready = self.log_dir / "sim-ready.json"
        ready.unlink(missing_ok=True)
        sim = self._spawn("sim", "infermesh.services.sim", "--engines", str(s.engines),
                          "--num-gpu-blocks", str(s.num_gpu_blocks),
                          "--block-size", str(s.block_size), "--time-scale", str(s.time_scale),
                          "--max-num-seqs", str(s.max_num_seqs), "--ready-file", str(ready),
                          *s.extra)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if sim.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"simulator did not start (logs in {self.log_dir})")
            time.sleep(0.05)
        bus = ["--nats-url", self.nats.url]
        for e in json.loads(ready.read_text())["engines"]:
            self._spawn(f"agent-{e['index']}", "infermesh.services.agent", *bus,
                        "--pod", f"sim-{e['index']}", "--engine-url", e["http"],
                        "--kv-endpoint", e["kv"], "--replay-endpoint", e["replay"],
                        "--http-port", "-1")
        for svc in ("tokenizer", "indexer", "scheduler"):
            self._spawn(svc, f"infermesh.services.{svc}", *bus, "--http-port", "-1")
        port = _free_port()
        self._spawn("ingress", "infermesh.services.ingress", *bus, "--port", str(port),
                    "--schedule-timeout-s", "2", "--tokenize-timeout-s", "5")
        self.url = f"http://127.0.0.1:{port}"
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if json.loads(r.read()).get("pods") == s.engines:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"system not ready (logs in {self.log_dir})")
            time.sleep(0.05)
        self._wait_services(deadline)
        return self

    def _wait_services(self, deadline: float) -> None:
        import asyncio

        import nats as nats_py

        async def ping() -> set[str]:
            nc = await nats_py.connect(self.nats.url)
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish("$SRV.PING", b"", reply=inbox)
            names: set[str] = set()
            try:
                while True:
                    m = await sub.next_msg(timeout=0.3)
                    names.add(json.loads(m.data).get("name", ""))
            except Exception:
                pass
            await nc.close()
            return names

        want = ("tokenizer", "indexer", "scheduler")
        while time.monotonic() < deadline:
            names = asyncio.run(ping())
            if all(any(w in n for n in names) for w in want):
                # The scheduler listens to heartbeats briefly before it answers.
                time.sleep(0.5)
                return
        raise RuntimeError(f"bus services not ready (logs in {self.log_dir})")

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and the nats-server."""
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        self.procs = []
        self.nats.stop()

    def __enter__(self) -> LocalSystem:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
