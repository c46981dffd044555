"""A plan, running: its state folder written, every process supervised, readiness waited for.

`infermesh up`, `infermesh bench` and the test fixtures all run a system through
:class:`LocalSystem`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from infermesh.libs.bus import ClientSecurity, connect, write_bus_auth
from infermesh.libs.bus.security import OBSERVER, ServerTLS
from infermesh.libs.bus.server import node_config, route_peers
from infermesh.libs.process.ports import check_ports_free
from infermesh.libs.process.process import Process
from infermesh.libs.process.ready import (
    NotReady,
    run_blocking,
    wait_bus_services,
    wait_for,
    wait_heartbeats,
    wait_http,
)
from infermesh.libs.process.supervisor import Supervisor
from infermesh.libs.telemetry import get_logger
from infermesh.proto.subjects import Subjects

from .plan import SystemPlan

log = get_logger("system")


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


def make_adapters(plan: SystemPlan) -> None:
    """Build the adapters ``loras`` names without a path (libs/tinymodel: deterministic PEFT
    LoRA weights per name for the served model), and the LoRA directory."""
    if not plan.spec.loras:
        return
    from infermesh.libs.tinymodel import build_adapter, ensure_model_folder

    plan.lora_dir.mkdir(parents=True, exist_ok=True)
    made = [item for item in plan.spec.loras if "=" not in item]
    if not made:
        return
    # The tiny model is built when missing; a model folder of the user's is only read.
    model = plan.model_dir if plan.spec.model else ensure_model_folder(plan.model_dir)
    for name in made:
        build_adapter(plan.lora_dir / name, name, model)


def prepare_state(plan: SystemPlan) -> None:
    """Write what the processes read at start: NATS node configs, users and credentials, and
    the LoRA adapters the engines load."""
    spec = plan.spec
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    plan.logs_dir.mkdir(parents=True, exist_ok=True)
    make_adapters(plan)
    tls = None
    if spec.nats_tls_cert:
        tls = ServerTLS(str(Path(spec.nats_tls_cert).resolve()),
                        str(Path(spec.nats_tls_key).resolve()))
    nodes = plan.of_kind("nats")
    if spec.bus_auth or nodes:
        _private_dir(plan.bus_dir)
    if spec.bus_auth:
        ca = str(Path(spec.nats_tls_ca).resolve()) if spec.nats_tls_ca else ""
        write_bus_auth(plan.state_dir, spec.subject_prefix,
                       [(spec.pool, pod) for pod in plan.pods], tls_ca=ca)
    routes = plan.layout.nats_route
    for i, node in enumerate(nodes):
        cluster = len(nodes) > 1
        text = node_config(
            host=spec.host, server_name=node.name, cluster="infermesh" if cluster else "",
            route_port=routes[i] if cluster else 0,
            routes=[p for j, p in enumerate(routes) if j != i] if cluster else (),
            max_payload=spec.nats_max_payload, tls=tls,
            include="nats-auth.conf" if spec.bus_auth else "")
        conf = plan.bus_dir / f"{node.name}.conf"
        conf.write_text(text)
        conf.chmod(0o600)


class LocalSystem:
    """Start with :meth:`start` (or ``with``), keep alive with :meth:`check`, :meth:`stop`."""

    def __init__(self, plan: SystemPlan) -> None:
        self.plan = plan
        self.supervisor = Supervisor(plan.logs_dir, on_restart=self._on_restart)
        for p in plan.processes:
            self.supervisor.add(p.name, p.argv, p.env, stage=p.stage)
        self.actuator: Any = None  # LocalActuator, with autoscale (started once the system is)

    # ------------------------------------------------------------------ access

    @property
    def url(self) -> str:
        """The OpenAI API base URL of the first ingress (no ``/v1``)."""
        return self.plan.ingress_urls[0]

    @property
    def nats_url(self) -> str:
        """Every NATS URL, comma-separated."""
        return self.plan.nats_url

    def proc(self, name: str) -> Process:
        """The running process called ``name`` (as the plan names it)."""
        return self.supervisor.procs[name]

    def procs(self, kind: str) -> list[Process]:
        """The processes of one kind (``scheduler``, ``agent``, ...), in plan order."""
        return [self.supervisor.procs[p.name] for p in self.plan.of_kind(kind)]

    def security(self) -> ClientSecurity | None:
        """How the system's own observer connections log in."""
        spec = self.plan.spec
        ca = str(Path(spec.nats_tls_ca).resolve()) if spec.nats_tls_ca else ""
        if spec.bus_auth:
            from infermesh.libs.bus import Credentials

            c = Credentials.read(self.plan.credentials(OBSERVER))
            return ClientSecurity(user=c.user, password=c.password, tls_ca=ca)
        return ClientSecurity(tls_ca=ca) if ca else None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 120.0) -> LocalSystem:
        """Start every process and return once the whole system serves; on failure everything
        started is stopped again and :class:`NotReady` says what did not come up."""
        check_ports_free([(port.number, port.what, port.flag)
                          for p in self.plan.processes for port in p.ports],
                         self.plan.spec.host)
        prepare_state(self.plan)
        try:
            self._start_nats(timeout)
            for p in self.plan.processes:
                if p.kind != "nats" and not p.parked:
                    self.supervisor.start(p.name)
            self.wait_ready(timeout)
            if self.plan.spec.autoscale:
                from .actuator import LocalActuator

                self.actuator = LocalActuator(self)
                self.actuator.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_nats(self, timeout: float) -> None:
        nodes = self.plan.of_kind("nats")
        for node in nodes:
            self.supervisor.start(node.name)
        for node in nodes:
            wait_http(node.health_url, timeout, [self.proc(node.name)])
        if len(nodes) > 1:
            host = self.plan.spec.host
            want = {n.name for n in nodes}
            mons = self.plan.layout.nats_monitor
            wait_for(lambda: all(want - {n.name} <= route_peers(host, mons[i])
                                 for i, n in enumerate(nodes)),
                     "NATS cluster routes", timeout, self.procs("nats"))

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Engines answer, every pod's heartbeat says ready, every bus service answers
        ``$SRV.PING``, and every ingress sees every pod."""
        plan = self.plan
        started = [p for p in plan.processes if not p.parked]
        watch = [self.proc(p.name) for p in started]
        for p in plan.of_kind("sim"):
            if not p.parked:
                wait_http(p.health_url, timeout, watch)
        run_blocking(self._wait_bus(timeout, watch))
        n = len(plan.active_pods)
        for p in plan.of_kind("ingress"):
            wait_http(p.health_url, timeout, watch, check=lambda b: b.get("pods") == n)
        for p in started:
            if p.health_url and p.kind not in ("sim", "ingress", "nats"):
                wait_http(p.health_url, timeout, watch)

    async def _wait_bus(self, timeout: float, watch: list[Process]) -> None:
        nc = await connect(self.plan.nats_url, "system-watch", security=self.security())
        try:
            prefix = Subjects(self.plan.spec.subject_prefix)
            await wait_heartbeats(nc, prefix.pod_state_all, self.plan.active_pods, timeout,
                                  watch)
            await wait_bus_services(nc, self.plan.micro_services(), timeout, watch)
        finally:
            await nc.close()

    def check(self) -> list[Process]:
        """Restart what died (after its backoff); return what was restarted."""
        return self.supervisor.check()

    def _on_restart(self, proc: Process, code: int | None) -> None:
        log.warning("process_restarted", process=proc.name, exit_status=code,
                    restarts=self.supervisor.restarts(proc.name), log=str(proc.log))

    def stop(self) -> None:
        """Stop every process (ingress first, the bus last); the actuator first of all."""
        if self.actuator is not None:
            self.actuator.stop()
            self.actuator = None
        self.supervisor.stop_all()

    def remove_secrets(self) -> None:
        """Delete the generated NATS configs and credentials (they are worthless once the
        run is over)."""
        shutil.rmtree(self.plan.bus_dir, ignore_errors=True)

    def __enter__(self) -> LocalSystem:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


__all__ = ["LocalSystem", "NotReady", "prepare_state"]
