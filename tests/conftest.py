"""Shared fixtures: a real nats-server, the tiny model folder, simulator and agent processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infermesh.libs.bus import NatsServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The deterministic tiny model folder (built once, reused)."""
    from infermesh.libs.tinymodel import ensure_model_folder

    return ensure_model_folder()


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A real nats-server on free ports, stopped after the test."""
    srv = NatsServer(max_payload=8 * 1024 * 1024)
    srv.start()
    yield srv
    srv.stop()


class Proc:
    """A child process started by a test; always stopped (process group) at teardown."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, log: Path | None = None):
        self.args = args
        self.env = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(self.args, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=out, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text()[-n:] if self.log else ""
        except OSError:
            return ""


class ProcessManager:
    """Starts simulator and agent processes and cleans all of them up."""

    def __init__(self, tmp: Path, model_dir: Path) -> None:
        self.tmp = tmp
        self.model_dir = model_dir
        self.procs: list[Proc] = []
        self._n = 0

    def _log(self, name: str) -> Path:
        self._n += 1
        return self.tmp / f"{self._n:02d}-{name}.log"

    def sim(self, *extra: str, engines: int = 1, timeout: float = 60.0) -> tuple[Proc, dict]:
        """Start `infermesh sim` and wait for its ready file; return (proc, ready info)."""
        ready = self.tmp / f"sim-ready-{self._n}.json"
        ready.unlink(missing_ok=True)
        p = Proc([sys.executable, "-m", "infermesh.services.sim", "--engines", str(engines),
                  "--model", str(self.model_dir), "--ready-file", str(ready), *extra],
                 log=self._log("sim")).start()
        self.procs.append(p)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if not p.alive():
                raise RuntimeError("sim exited early:\n" + p.tail())
            if time.monotonic() > deadline:
                raise TimeoutError("sim not ready:\n" + p.tail())
            time.sleep(0.02)
        return p, json.loads(ready.read_text())

    def agent(self, nats_url: str, engine: dict, pod: str, *extra: str) -> Proc:
        """Start `infermesh agent` for one engine of a sim's ready info."""
        p = Proc([sys.executable, "-m", "infermesh.services.agent", "--nats-url", nats_url,
                  "--pod", pod, "--engine-url", engine["http"], "--kv-endpoint", engine["kv"],
                  "--replay-endpoint", engine["replay"], "--http-port", "-1", *extra],
                 log=self._log(f"agent-{pod}")).start()
        self.procs.append(p)
        return p

    def service(self, module: str, *args: str, name: str = "",
                env: dict[str, str] | None = None) -> Proc:
        """Start ``python -m infermesh.services.<module> ARGS`` (stopped at teardown)."""
        p = Proc([sys.executable, "-m", f"infermesh.services.{module}", *args], env=env,
                 log=self._log(name or module)).start()
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture
def procs(tmp_path: Path, model_dir: Path) -> Iterator[ProcessManager]:
    """Process manager whose children are all stopped at teardown."""
    pm = ProcessManager(tmp_path, model_dir)
    yield pm
    pm.stop_all()
