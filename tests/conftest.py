"""Shared fixtures: a real nats-server, the tiny model folder, and service processes started the
way the system plan starts them (services/system), always stopped at teardown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infermesh.libs.bus import NatsServer
from infermesh.libs.process.process import Process
from infermesh.libs.process.ready import wait_ready_file
from infermesh.services.system.plan import ENGINE_ENV, command

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """Each test starts with the logging set-up the previous one found: a test that runs a
    command in-process (``infermesh bench`` sets the level to warning) must not silence the
    log lines later tests assert on."""
    import structlog

    from infermesh.libs.telemetry import logging as tlog

    saved, configured = structlog.get_config(), tlog._configured
    yield
    structlog.configure(**saved)
    tlog._configured = configured


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


class ProcessManager:
    """Starts service processes for one test (logs in its tmp folder) and stops all of them."""

    def __init__(self, tmp: Path, model_dir: Path) -> None:
        self.tmp = tmp
        self.model_dir = model_dir
        self.procs: list[Process] = []
        self.cleanups: list[Any] = []  # called first at teardown (e.g. a system's actuator)
        self._n = 0

    def _log(self, name: str) -> Path:
        self._n += 1
        return self.tmp / f"{self._n:02d}-{name}.log"

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        """Start ``argv`` (stopped at teardown); engines' hash seed is fixed, as in the plan."""
        p = Process(name, argv, env={**ENGINE_ENV, **(env or {})}, log=self._log(name)).start()
        self.procs.append(p)
        return p

    def sim(self, *extra: str, engines: int = 1, timeout: float = 60.0
            ) -> tuple[Process, dict[str, Any]]:
        """Start `infermesh sim` and wait for its ready file; return (process, what the ready
        file details: model and each engine's http/kv/replay endpoints)."""
        ready = self.tmp / f"sim-ready-{self._n}.json"
        ready.unlink(missing_ok=True)
        p = self.start("sim", [*command("sim"), "--engines", str(engines),
                               "--model", str(self.model_dir), "--ready-file", str(ready),
                               *extra])
        return p, wait_ready_file(ready, timeout, [p]).detail

    def agent(self, nats_url: str, engine: dict[str, Any], pod: str, *extra: str) -> Process:
        """Start `infermesh agent` for one engine of a sim's ready detail."""
        return self.start(f"agent-{pod}", [
            *command("agent"), "--nats-url", nats_url, "--pod", pod,
            "--engine-url", engine["http"], "--kv-endpoint", engine["kv"],
            "--replay-endpoint", engine["replay"], "--http-port", "-1", *extra])

    def service(self, service: str, *args: str, name: str = "",
                env: dict[str, str] | None = None) -> Process:
        """Start ``infermesh.services.<service> ARGS``."""
        return self.start(name or service, [*command(service), *args], env)

    def stop_all(self) -> None:
        for fn in self.cleanups:
            fn()
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture
def procs(tmp_path: Path, model_dir: Path) -> Iterator[ProcessManager]:
    """Process manager whose children are all stopped at teardown."""
    pm = ProcessManager(tmp_path, model_dir)
    yield pm
    pm.stop_all()
