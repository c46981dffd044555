"""The whole system as processes, started through the system plan (services/system) as
`infermesh up` starts it: simulated engines, agents, tokenizer, indexer(s), scheduler(s) and the
ingress, on the test's own nats-server and free ports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infermesh.libs.bus import BusAuth, NatsServer
from infermesh.libs.process.process import Process
from infermesh.services.system.plan import plan
from infermesh.services.system.run import LocalSystem
from infermesh.services.system.spec import SystemSpec

from .conftest import ProcessManager


@dataclass
class Stack:
    nats: NatsServer
    system: LocalSystem
    ingress_url: str
    engines: list[dict[str, Any]]
    procs: ProcessManager
    schedulers: list[Process] = field(default_factory=list)
    indexers: list[Process] = field(default_factory=list)
    ingress: Process | None = None

    @property
    def pods(self) -> list[str]:
        return list(self.system.plan.pods)


def start_stack(procs: ProcessManager, nats: NatsServer, *, engines: int = 4,
                schedulers: int = 1, indexers: int = 1, auth: BusAuth | None = None,
                settings: dict[str, dict[str, Any]] | None = None, timeout: float = 90.0,
                **spec: Any) -> Stack:
    """Start every process and wait until the system serves (every engine visible to the
    ingress, every bus service answering).

    With ``auth`` (from ``write_bus_auth``; the server runs its config) every process connects
    as its own identity: the plan's state folder is the one ``auth`` was written to, so the plan
    reuses its passwords. ``settings`` and ``spec`` go to :class:`SystemSpec`; the fleet
    console only when asked for (``console=True``): a process the other tests do not need.
    """
    state = auth.config_file.parent.parent if auth else procs.tmp / "system"
    sim = {"hash_seed": "0", **(settings or {}).get("sim", {})}
    system = LocalSystem(plan(SystemSpec(
        engines=engines, schedulers=schedulers, indexers=indexers, nats_url=nats.url,
        nats_auth=auth is not None, free_ports=True, time_scale=spec.pop("time_scale", 0.02),
        state_dir=str(state), settings={**(settings or {}), "sim": sim},
        console=spec.pop("console", False), **spec)))
    # Stopped at teardown with the test's other processes (ingress first).
    procs.procs += system.supervisor.procs.values()
    system.start(timeout)
    if system.actuator is not None:  # (autoscale) stopped before the processes
        procs.cleanups.append(system.actuator.stop)
    lay = system.plan.layout
    host = system.plan.spec.host
    return Stack(
        nats=nats, system=system, ingress_url=system.url,
        engines=[{"index": i, "http": f"http://{host}:{lay.engine_http[i]}",
                  "kv": f"tcp://{host}:{lay.engine_kv[i]}",
                  "replay": f"tcp://{host}:{lay.engine_kv[i] + 1}"} for i in range(engines)],
        procs=procs, schedulers=system.procs("scheduler"), indexers=system.procs("indexer"),
        ingress=system.procs("ingress")[0],
    )


def log_dir(stack: Stack) -> Path:
    """Where the stack's processes write their logs."""
    return stack.system.plan.logs_dir
