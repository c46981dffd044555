"""Peer routers for `infermesh bench --peers`: other projects' routers in front of the same
simulated fleet our profiles get.

A peer row runs one router policy (``sglang-router:cache_aware``) in front of a fresh, cold fleet
of simulated engines laid out by the same system plan as our profiles (the preset's
``SystemSpec``: engines, blocks, time scale, engine arguments), but with only the engine
processes started (:class:`SimFleet`): no bus, agents or services. The router gets the engines'
OpenAI URLs; the bench waits for its ``/readiness`` to report every worker healthy, sends the
same requests at the same moments, and stops the router and the fleet afterwards.

The routers install from PyPI (``pip install 'infermesh[peers]'``); their executables are looked
for next to the running Python, then on ``PATH``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from infermesh.libs.process.ports import check_ports_free, free_port
from infermesh.libs.process.process import Process
from infermesh.libs.process.ready import wait_http
from infermesh.libs.process.supervisor import Supervisor
from infermesh.services.sim.config import SimConfig
from infermesh.services.system.plan import ENGINE_ENV, SystemPlan, plan
from infermesh.services.system.spec import SystemSpec

INSTALL_HINT = "pip install 'infermesh[peers]'"


class PeerError(RuntimeError):
    """A requested peer cannot run (not installed, or a bad policy name); one line."""


# ------------------------------------------------------------------ the fleet


class SimFleet:
    """The simulated engines of ``spec``'s plan, and nothing else, on free ports.

    The plan is the one our profiles run (same engine command lines, environment, one process
    per engine on 2+ CPUs); its other processes (nats, agents, services, ingress) are not
    started. Logs go to ``state_dir/logs``.
    """

    def __init__(self, spec: SystemSpec, state_dir: Path) -> None:
        if spec.engine != "sim":
            raise PeerError(f"peer routers run in front of simulated engines; the preset's "
                            f"engines are {spec.engine!r}")
        self.plan: SystemPlan = plan(dataclasses.replace(
            spec, free_ports=True, state_dir=str(state_dir)))
        self.sims = self.plan.of_kind("sim")
        self.supervisor = Supervisor(self.plan.logs_dir)
        for p in self.sims:
            self.supervisor.add(p.name, p.argv, p.env, restart=False, stage=p.stage)

    @property
    def host(self) -> str:
        return self.plan.spec.host

    @property
    def pods(self) -> tuple[str, ...]:
        """Engine names, in the order of :attr:`urls`."""
        return self.plan.pods

    @property
    def urls(self) -> list[str]:
        """Each engine's OpenAI base URL (no ``/v1``)."""
        return [f"http://{self.host}:{p}" for p in self.plan.layout.engine_http]

    @property
    def kv_endpoints(self) -> list[tuple[str, str]]:
        """Each engine's ZMQ KV-event and replay endpoints."""
        return [(f"tcp://{self.host}:{k}", f"tcp://{self.host}:{k + 1}")
                for k in self.plan.layout.engine_kv]

    @property
    def block_size(self) -> int:
        return self.plan.spec.block_size or int(SimConfig().block_size)

    def procs(self) -> list[Process]:
        """The engine processes."""
        return [self.supervisor.procs[p.name] for p in self.sims]

    def start(self, timeout: float = 120.0) -> SimFleet:
        """Start every engine and wait for its ``/health``; on failure stop them again."""
        check_ports_free([(port.number, port.what, port.flag)
                          for p in self.sims for port in p.ports], self.host)
        self.plan.logs_dir.mkdir(parents=True, exist_ok=True)
        try:
            for p in self.sims:
                self.supervisor.start(p.name)
            for p in self.sims:
                wait_http(p.health_url, timeout, self.procs())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every engine (SIGTERM, SIGKILL after 10 s)."""
        self.supervisor.stop_all()

    def request_counts(self) -> dict[str, int]:
        """Requests each engine finished (its ``vllm:request_success_total``), by pod."""
        out: dict[str, int] = {}
        for pod, url in zip(self.pods, self.urls, strict=True):
            out[pod] = int(sum(metric_values(scrape(url + "/metrics"),
                                             "vllm:request_success_total")))
        return out


def scrape(url: str, timeout: float = 5.0) -> str:
    """GET a Prometheus text page; empty when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return str(r.read().decode(errors="replace"))
    except OSError:
        return ""


def metric_values(text: str, name: str, labels: str = "") -> list[float]:
    """The values of every sample of ``name`` (whose label set contains ``labels``)."""
    out: list[float] = []
    for line in text.splitlines():
        if not line.startswith(name) or line[len(name):len(name) + 1] not in ("{", " "):
            continue
        head, _, value = line.rpartition(" ")
        if labels and labels not in head:
            continue
        try:
            out.append(float(value))
        except ValueError:
            continue
    return out


# ------------------------------------------------------------------ the peers


@dataclass(frozen=True)
class RouterSetup:
    """Where one router runs and what it fronts."""

    host: str
    port: int
    metrics_port: int
    fleet: SimFleet
    model: str  # the served model name


@dataclass(frozen=True)
class Peer:
    """A router we compare with: its executable, its policies, its command line."""

    name: str
    executable: str
    package: str  # the pinned PyPI requirement (pyproject's `peers` extra)
    policies: tuple[str, ...]  # the ones the bench knows how to run, in table order
    argv: Callable[[str, str, RouterSetup], list[str]]  # (executable, policy, setup)
    env: Callable[[str, RouterSetup], dict[str, str]] = lambda policy, setup: {}
    ready_path: str = "/readiness"

    def unavailable(self, policy: str, engines: int) -> str | None:
        """Why ``policy`` cannot run on ``engines`` engines (None: it can)."""
        if policy == "power_of_two" and engines < 2:
            return "power_of_two needs at least 2 engines"
        return None


def _sglang_argv(exe: str, policy: str, s: RouterSetup) -> list[str]:
    return [exe, "launch", "--host", s.host, "--port", str(s.port),
            "--worker-urls", *s.fleet.urls, "--policy", policy,
            # Engines are up before the router starts; check them every second, not every 30.
            "--worker-startup-check-interval", "1",
            "--prometheus-host", s.host, "--prometheus-port", str(s.metrics_port),
            "--shutdown-grace-period-secs", "1",
            # Per-request INFO lines would cost CPU our services do not spend.
            "--log-level", "warn"]


def _vllm_argv(exe: str, policy: str, s: RouterSetup) -> list[str]:
    argv = [exe, "--host", s.host, "--port", str(s.port),
            "--worker-urls", *s.fleet.urls, "--policy", policy,
            "--worker-startup-check-interval", "1",
            "--prometheus-host", s.host, "--prometheus-port", str(s.metrics_port),
            "--log-level", "warning"]
    if policy == "kv_aware":
        # Static KV event sources: each engine's ZMQ stream (and replay), the engines' block
        # size and model name; the router tokenizes with VLLM_ROUTER_TOKENIZER (env below).
        for url, (kv, replay) in zip(s.fleet.urls, s.fleet.kv_endpoints, strict=True):
            argv += ["--kv-event-source", f"{url}={kv}", "--kv-event-replay-source",
                     f"{url}={replay}"]
        argv += ["--kv-event-block-size", str(s.fleet.block_size), "--kv-event-model", s.model]
    return argv


def _vllm_env(policy: str, s: RouterSetup) -> dict[str, str]:
    if policy != "kv_aware":
        return {}
    return {"VLLM_ROUTER_TOKENIZER": str(s.fleet.plan.model_dir), **ENGINE_ENV}


PEERS: dict[str, Peer] = {
    "sglang-router": Peer(
        name="sglang-router", executable="sglang-router", package="sglang-router==0.3.2",
        policies=("cache_aware", "power_of_two", "consistent_hash", "round_robin", "random"),
        argv=_sglang_argv),
    "vllm-router": Peer(
        name="vllm-router", executable="vllm-router", package="vllm-router==0.1.17",
        policies=("cache_aware", "power_of_two", "consistent_hash", "round_robin", "random",
                  "kv_aware"),
        argv=_vllm_argv, env=_vllm_env),
}
ALL_PEER_POLICIES = tuple(dict.fromkeys(p for peer in PEERS.values() for p in peer.policies))


def find_executable(name: str) -> Path | None:
    """``name`` next to the running Python (a venv's bin), else on ``PATH``."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return here
    found = shutil.which(name)
    return Path(found) if found else None


def offered_policies(exe: Path, peer: Peer) -> tuple[str, ...] | None:
    """The ``--policy`` choices the installed router lists in its ``--help`` (None: unknown)."""
    argv = [str(exe), "launch", "--help"] if peer.name == "sglang-router" else [str(exe),
                                                                                  "--help"]
    try:
        text = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"--policy \{([^}]*)\}", text)
    return tuple(x.strip() for x in m.group(1).split(",")) if m else None


def package_version(peer: Peer) -> str | None:
    """The installed version of the peer's package (None: not found)."""
    from importlib import metadata

    try:
        return metadata.version(peer.package.split("==")[0])
    except metadata.PackageNotFoundError:
        return None


@dataclass
class PeerPlan:
    """What will run for one peer."""

    peer: Peer
    executable: Path
    version: str | None
    policies: list[str]
    skipped: dict[str, str]  # policy → why it does not run

    def rows(self) -> list[str]:
        return [f"{self.peer.name}:{p}" for p in self.policies]


def resolve(names: Sequence[str], policies: Sequence[str] | None, engines: int
            ) -> list[PeerPlan]:
    """Check the requested peers are installed and pick the policies each runs.

    Raises :class:`PeerError` (one line, with the install command) when one is missing.
    A policy that a peer does not offer (or that cannot run on ``engines`` engines) is skipped
    with its reason in ``skipped``.
    """
    out: list[PeerPlan] = []
    for name in names:
        peer = PEERS[name]
        exe = find_executable(peer.executable)
        if exe is None:
            raise PeerError(f"{name} is not installed (looked in {Path(sys.executable).parent} "
                            f"and on PATH): {INSTALL_HINT}")
        offered = offered_policies(exe, peer)
        version = package_version(peer)
        run: list[str] = []
        skipped: dict[str, str] = {}
        for policy in policies or peer.policies:
            label = f"{name} {version}" if version else name
            if policy not in peer.policies:
                skipped[policy] = f"the bench does not run {name} with {policy}"
            elif offered is not None and policy not in offered:
                skipped[policy] = (f"{label} has no {policy} policy (its --policy takes "
                                   f"{', '.join(offered)})")
            elif (why := peer.unavailable(policy, engines)) is not None:
                skipped[policy] = why
            else:
                run.append(policy)
        out.append(PeerPlan(peer=peer, executable=exe, version=version, policies=run,
                            skipped=skipped))
    return out


class PeerRouter:
    """One peer router process, with one policy, in front of a started :class:`SimFleet`."""

    def __init__(self, peer: Peer, executable: Path, policy: str, fleet: SimFleet, *,
                 model: str, log_dir: Path) -> None:
        self.peer = peer
        self.policy = policy
        self.fleet = fleet
        host = fleet.host
        self.setup = RouterSetup(host=host, port=free_port(host), metrics_port=free_port(host),
                                 fleet=fleet, model=model)
        argv = peer.argv(str(executable), policy, self.setup)
        self.process = Process(f"{peer.name}:{policy}", argv, env=peer.env(policy, self.setup),
                               log=log_dir / f"{peer.name}.log")

    @property
    def url(self) -> str:
        """The router's OpenAI base URL (no ``/v1``)."""
        return f"http://{self.setup.host}:{self.setup.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def start(self, timeout: float = 60.0) -> PeerRouter:
        """Start the router; return once its readiness endpoint counts every engine healthy."""
        n = len(self.fleet.urls)
        self.process.start()
        try:
            wait_http(self.url + self.peer.ready_path, timeout,
                      [self.process, *self.fleet.procs()],
                      check=lambda b: int(b.get("healthy_workers", n)) >= n)
        except BaseException:
            self.stop()
            raise
        return self

    def metrics(self) -> str:
        """The router's Prometheus page (empty when it does not answer)."""
        return scrape(f"http://{self.setup.host}:{self.setup.metrics_port}/metrics")

    def note(self) -> str | None:
        """A remark on the run for the results (vllm-router kv_aware: whether its KV index ever
        matched a prefix)."""
        if self.peer.name == "vllm-router" and self.policy == "kv_aware":
            text = self.metrics()
            total = sum(metric_values(text, "vllm_router_kv_placement_lookups_total"))
            misses = sum(metric_values(text, "vllm_router_kv_placement_lookups_total",
                                       'result="miss"'))
            if total and misses >= total:
                return (f"the router's KV index matched no prefix in {int(total)} lookups "
                        "(all misses): against these engines' KV events it routed by load only")
        return None

    def stop(self) -> None:
        """SIGTERM to the router's process group, SIGKILL after 10 s."""
        self.process.stop(timeout=10.0)


__all__ = ["ALL_PEER_POLICIES", "INSTALL_HINT", "PEERS", "Peer", "PeerError", "PeerPlan",
           "PeerRouter", "SimFleet", "find_executable", "metric_values", "resolve"]
