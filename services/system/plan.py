"""`plan(spec)`: every process of a system, with its command line, environment and ports.

This is the one place that names pods, lays out ports (engine i: HTTP P+i, KV events K+2i,
replay K+2i+1; node i of a NATS cluster: +i; ops ports one after another) and gives each process
its NATS identity. Command lines are built from the services' config classes
(:func:`infermesh.libs.config.to_argv`), so a config field reaches `infermesh up`, the bench, the
tests and Tilt without more code here. The plan is data: :mod:`.run` starts it, ``infermesh
tilt-plan`` hands it to Tilt.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from infermesh.libs.bus import credentials_path
from infermesh.libs.bus.security import agent_user
from infermesh.libs.bus.server import HEALTH_PATH, nats_server_argv
from infermesh.libs.config import ConfigError, default_of, to_argv
from infermesh.libs.process.ports import free_port, free_port_range
from infermesh.libs.process.runfile import default_state_dir
from infermesh.libs.scheduling.config import SchedulingKnobs
from infermesh.libs.tinymodel import DEFAULT_MODEL_NAME, default_model_dir
from infermesh.services.agent.config import AgentConfig
from infermesh.services.autoscaler.config import AutoscalerConfig
from infermesh.services.console.config import ConsoleConfig
from infermesh.services.indexer.config import IndexerConfig
from infermesh.services.ingress.config import IngressConfig
from infermesh.services.scheduler.config import SchedulerConfig
from infermesh.services.sim.config import SimConfig
from infermesh.services.tokenizer.config import TokenizerConfig

from .spec import REPLICATED, SystemSpec

ROOT = Path(__file__).resolve().parents[2]

# The scheduler settings an ingress's own scheduler replica (schedule_here) takes too.
SCHEDULING_FIELDS = frozenset(f.name for f in fields(SchedulingKnobs))

CONFIGS: dict[str, type[Any]] = {
    "sim": SimConfig, "agent": AgentConfig, "tokenizer": TokenizerConfig,
    "indexer": IndexerConfig, "scheduler": SchedulerConfig, "ingress": IngressConfig,
    "autoscaler": AutoscalerConfig, "console": ConsoleConfig,
}
# The name each bus service answers `$SRV.PING` with (nats-py micro).
BUS_SERVICE = {"tokenizer": "infermesh-tokenizer", "indexer": "infermesh-indexer",
               "scheduler": "infermesh-scheduler"}
# Start order; the stop goes the other way (nothing logs the bus vanishing under it).
STAGE = {"nats": 0, "sim": 1, "agent": 2, "tokenizer": 3, "indexer": 3, "scheduler": 3,
         "autoscaler": 3, "console": 3, "ingress": 4}

# vLLM on the CPU (docs/vllm.md says why each is there).
VLLM_CPU_BLOCK_SIZE = 32  # the CPU attention backend supports multiples of 32 only
VLLM_NUM_GPU_BLOCKS = 512
VLLM_MAX_MODEL_LEN = 2048
VLLM_ARGS = ["--max-model-len", str(VLLM_MAX_MODEL_LEN), "--max-num-seqs", "16",
             "--enforce-eager", "--enable-prompt-tokens-details"]
VLLM_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_SERVER_DEV_MODE": "1",  # POST /reset_prefix_cache
}
# Engines hash blocks with Python's hash seed: one seed for every engine and restart.
ENGINE_ENV = {"PYTHONHASHSEED": "0"}


def lora_modules(spec: SystemSpec, lora_dir: Path) -> dict[str, Path]:
    """Adapter name → folder of every ``spec.loras`` entry: NAME is made in ``lora_dir/NAME``
    (services/system/run.py, by libs/tinymodel), NAME=PATH is that path."""
    out: dict[str, Path] = {}
    for item in spec.loras:
        name, _, path = item.partition("=")
        out[name] = Path(path).expanduser().resolve() if path else lora_dir / name
    return out


def pod_name(engine: str, i: int) -> str:
    """The pod name of engine ``i`` (``sim-0``, ``vllm-3``): on the bus, in logs, in Tilt."""
    return f"{engine}-{i}"


@dataclass(frozen=True)
class Port:
    """A port a process listens on, with what it is and the `up` flag that moves it."""

    number: int
    what: str
    flag: str


@dataclass(frozen=True)
class ProcessSpec:
    """One process of the plan."""

    name: str
    kind: str  # nats, sim, agent, tokenizer, indexer, scheduler, autoscaler, console, ingress
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    after: tuple[str, ...] = ()  # processes it needs (Tilt's resource_deps)
    ports: tuple[Port, ...] = ()
    health_url: str = ""  # GET → 200 once it serves (HTTP readiness, Tilt's probe)
    bus_service: str = ""  # the NATS micro service it answers $SRV.PING as
    pods: tuple[str, ...] = ()  # pods it serves (engines) or bridges (agents)
    links: Mapping[str, str] = field(default_factory=dict)  # what the summary shows
    watch: tuple[str, ...] = ()  # source paths (Tilt restarts it when they change)
    parked: bool = False  # an engine slot (or its agent) the autoscaler starts when it wants

    @property
    def stage(self) -> int:
        """Start order group (stop goes the other way)."""
        return STAGE[self.kind]


@dataclass(frozen=True)
class Layout:
    """Every port of a plan, resolved (free ones picked)."""

    nats: tuple[int, ...]
    nats_monitor: tuple[int, ...]
    nats_route: tuple[int, ...]
    engine_http: tuple[int, ...]
    engine_kv: tuple[int, ...]  # replay: +1
    ingress: tuple[int, ...]
    console: tuple[int, ...]  # one port, or none (console off)
    ops: tuple[int, ...]  # agents, tokenizers, indexers, schedulers, autoscaler; -1: none


@dataclass(frozen=True)
class SystemPlan:
    """A spec resolved into processes."""

    spec: SystemSpec
    state_dir: Path
    model_dir: Path
    served_model: str
    nats_urls: tuple[str, ...]
    pods: tuple[str, ...]
    processes: tuple[ProcessSpec, ...]
    layout: Layout

    @property
    def active_pods(self) -> tuple[str, ...]:
        """The pods started with the system (the rest are parked engine slots)."""
        return self.pods[: self.spec.engines]

    @property
    def nats_url(self) -> str:
        """Every NATS URL, comma-separated (what ``--nats-url`` takes)."""
        return ",".join(self.nats_urls)

    @property
    def ingress_urls(self) -> list[str]:
        """The OpenAI API base URL of each ingress replica (no ``/v1``)."""
        scheme = "https" if self.spec.ingress_tls_cert else "http"
        return [f"{scheme}://{self.spec.host}:{p}" for p in self.layout.ingress]

    @property
    def lora_dir(self) -> Path:
        """The LoRA directory: adapters made for ``spec.loras``, and any an engine loads when
        a request names it (vLLM's filesystem resolver)."""
        return self.state_dir / "loras"

    def lora_modules(self) -> dict[str, Path]:
        """Adapter name → folder of every ``spec.loras`` entry."""
        return lora_modules(self.spec, self.lora_dir)

    @property
    def logs_dir(self) -> Path:
        """One log file per process."""
        return self.state_dir / "logs"

    @property
    def bus_dir(self) -> Path:
        """NATS configs and credentials (0700)."""
        return self.state_dir / "bus"

    def credentials(self, user: str) -> Path:
        """The credentials file of NATS user ``user``."""
        return credentials_path(self.state_dir, user)

    def of_kind(self, kind: str) -> list[ProcessSpec]:
        """The processes of one kind, in plan order."""
        return [p for p in self.processes if p.kind == kind]

    def process(self, name: str) -> ProcessSpec:
        """The process called ``name``."""
        for p in self.processes:
            if p.name == name:
                return p
        raise KeyError(name)

    def micro_services(self) -> dict[str, int]:
        """How many instances of each NATS micro service the system runs."""
        out: dict[str, int] = {}
        for p in self.processes:
            if p.bus_service:
                out[p.bus_service] = out.get(p.bus_service, 0) + 1
        return out


def engine_slots(spec: SystemSpec) -> int:
    """Engines the plan lays out: ``engines``, or with ``autoscale`` as many as the autoscaler
    may ask for (its ``max_replicas``), the ones past ``engines`` parked until it does."""
    if not spec.autoscale:
        return spec.engines
    raw = spec.settings.get("autoscaler", {}).get("max_replicas")
    most = int(raw) if raw is not None else int(default_of(AutoscalerConfig, "max_replicas"))
    return max(spec.engines, most)


def engine_role(spec: SystemSpec, i: int) -> str:
    """The P/D role of engine ``i``: the first ``prefill`` engines prefill, the rest decode;
    ``both`` without disaggregation."""
    if not spec.prefill:
        return "both"
    return "prefill" if i < spec.prefill else "decode"


def sim_per_process(spec: SystemSpec) -> bool:
    """Whether each simulated engine runs in a process of its own (always when autoscaling:
    engines are started and stopped one at a time)."""
    if spec.autoscale:
        return True
    if spec.sim_processes == "auto":
        return (os.cpu_count() or 1) > 1 and spec.engines > 1
    return spec.sim_processes == "each"


def layout(spec: SystemSpec, pick: Callable[[int], int] | None = None) -> Layout:
    """Resolve every port: bases from the spec, or free ones (``pick(n)`` returns a base with
    ``n`` consecutive free ports) where the spec says 0 or ``free_ports``."""
    rng = pick or (lambda n: free_port(spec.host) if n == 1 else free_port_range(n, spec.host))
    free = spec.free_ports

    def seq(base: int, n: int, step: int = 1, whole: bool = False) -> tuple[int, ...]:
        if n == 0:
            return ()
        if base and not free:
            return tuple(base + step * i for i in range(n))
        if whole:  # one process binds the run (port + i): the ports must be consecutive
            first = rng(step * n)
            return tuple(first + step * i for i in range(n))
        return tuple(rng(step) for _ in range(n))

    nodes = 0 if spec.nats_url else spec.nats_cluster
    one_sim = spec.engine == "sim" and not sim_per_process(spec)
    n_engines = engine_slots(spec)
    n_ops = n_engines + spec.tokenizers + spec.indexers + spec.schedulers + \
        (spec.autoscalers if spec.autoscale else 0)
    ops = (-1,) * n_ops if spec.ops_port < 0 else seq(spec.ops_port, n_ops)
    return Layout(
        nats=seq(spec.nats_port, nodes),
        nats_monitor=seq(spec.nats_monitor_port, nodes),
        nats_route=seq(spec.nats_route_port, nodes if nodes > 1 else 0),
        engine_http=seq(spec.engine_port, n_engines, whole=one_sim),
        engine_kv=seq(spec.kv_port, n_engines, step=2, whole=True),
        ingress=seq(spec.ingress_port, spec.ingresses),
        console=seq(spec.console_port, 1 if spec.console else 0),
        ops=ops,
    )


def command(service: str) -> list[str]:
    """How a service (``sim``, ``agent``, ``tools.kvchaos``, ...) is started: this Python,
    ``-m infermesh.services.<service>``."""
    return [sys.executable, "-m", f"infermesh.services.{service}"]


def _watch(kind: str) -> tuple[str, ...]:
    return (f"services/{kind}", "libs", "proto")


class _Builder:
    """Accumulates the processes of one plan."""

    def __init__(self, spec: SystemSpec, lay: Layout, state_dir: Path, model_dir: Path) -> None:
        self.spec = spec
        self.lay = lay
        self.state_dir = state_dir
        self.model_dir = model_dir
        self.host = spec.host
        self.procs: list[ProcessSpec] = []
        self.nats_urls = tuple(f"nats://{self.host}:{p}" for p in lay.nats)
        self.nats_url = spec.nats_url or ",".join(self.nats_urls)
        self._ops = iter(lay.ops)

    # ------------------------------------------------------------------ helpers

    def settings(self, kind: str, base: Mapping[str, Any]) -> dict[str, Any]:
        """The plan's values for ``kind``, overridden by the spec's settings for it."""
        return {**base, **self.spec.settings.get(kind, {})}

    def argv(self, kind: str, values: Mapping[str, Any]) -> list[str]:
        try:
            return to_argv(CONFIGS[kind], self.settings(kind, values))
        except ConfigError as e:
            raise ConfigError(f"{kind}: {e}") from None

    def bus(self) -> dict[str, Any]:
        return {"nats_url": self.nats_url, "subject_prefix": self.spec.subject_prefix}

    def bus_env(self, kind: str, user: str) -> dict[str, str]:
        """File paths only: passwords never appear in a command line or an environment."""
        pre = f"INFERMESH_{kind.upper()}_"
        env: dict[str, str] = {}
        if self.spec.bus_auth:
            env[pre + "NATS_CREDENTIALS"] = str(credentials_path(self.state_dir, user))
        if self.spec.nats_tls_ca:
            env[pre + "NATS_TLS_CA"] = str(Path(self.spec.nats_tls_ca).resolve())
        return env

    def nats_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.procs if p.kind == "nats")

    def ops_port(self) -> int:
        return next(self._ops)

    def ops(self, port: int) -> tuple[tuple[Port, ...], str, dict[str, str]]:
        if port < 0:
            return (), "", {}
        url = f"http://{self.host}:{port}"
        flag = "--ops-port" if not self.spec.free_ports else "--free-ports"
        return ((Port(port, "/health and /metrics", flag),), url + "/health",
                {"metrics": url + "/metrics"})

    # ------------------------------------------------------------------ processes

    def nats(self) -> None:
        n = len(self.lay.nats)
        for i in range(n):
            name = "nats" if n == 1 else f"nats-{i}"
            conf = self.state_dir / "bus" / f"{name}.conf"
            mon = self.lay.nats_monitor[i]
            ports = [Port(self.lay.nats[i], "NATS clients", "--nats-port"),
                     Port(mon, "NATS monitor", "--nats-monitor-port")]
            if n > 1:
                ports.append(Port(self.lay.nats_route[i], "NATS cluster routes",
                                  "--nats-route-port"))
            self.procs.append(ProcessSpec(
                name=name, kind="nats",
                argv=tuple(nats_server_argv(self.host, self.lay.nats[i], mon, conf,
                                            store_dir=self.state_dir / "bus" / "jetstream"
                                            / name)),
                ports=tuple(ports), health_url=f"http://{self.host}:{mon}{HEALTH_PATH}",
                links={"NATS": self.nats_urls[i], "monitor": f"http://{self.host}:{mon}"},
            ))

    def engine_values(self) -> dict[str, Any]:
        s = self.spec
        values: dict[str, Any] = {"model": str(self.model_dir), "time_scale": s.time_scale,
                                  "http_host": self.host,
                                  "served_model_name": self.served_model()}
        if s.loras:
            values.update({"loras": [f"{n}={p}" for n, p in self.lora_modules().items()],
                           "lora_dir": str(self.lora_dir), "runtime_lora_updating": True})
            if s.max_loras:
                values["max_loras"] = s.max_loras
        if s.block_size:
            values["block_size"] = s.block_size
        if s.num_gpu_blocks:
            values["num_gpu_blocks"] = s.num_gpu_blocks
        if s.prefill:  # P/D: the engines speak vLLM's NIXL connector protocol
            values["kv_connector"] = True
        if s.storage_dir:
            values["storage_dir"] = str(self.storage_dir())
            if s.storage_capacity_bytes:
                values["storage_capacity_bytes"] = s.storage_capacity_bytes
        return values

    @property
    def lora_dir(self) -> Path:
        """The LoRA directory (SystemPlan.lora_dir)."""
        return self.state_dir / "loras"

    def lora_modules(self) -> dict[str, Path]:
        """Adapter name → folder (SystemPlan.lora_modules)."""
        return lora_modules(self.spec, self.lora_dir)

    def storage_dir(self) -> Path:
        """The shared-storage tier's directory, absolute (every engine must name the same)."""
        return Path(self.spec.storage_dir).expanduser().resolve()

    def vllm_storage(self) -> tuple[dict[str, Any], list[str]]:
        """The agent's storage-tier settings for a vLLM engine: (values its config knows,
        flags for those it does not know yet)."""
        s = self.spec
        if not s.storage_dir:
            return {}, []
        wanted: dict[str, Any] = {"vllm_storage_dir": str(self.storage_dir())}
        if s.storage_capacity_bytes:
            wanted["vllm_storage_capacity_bytes"] = s.storage_capacity_bytes
        known = {f.name for f in fields(AgentConfig)}
        values = {k: v for k, v in wanted.items() if k in known}
        flags = [x for k, v in wanted.items() if k not in known
                 for x in ("--" + k.replace("_", "-"), str(v))]
        return values, flags

    def sims(self) -> list[tuple[str, str, dict[str, str]]]:
        """Simulated engines; for each: its pod, its process and where the agent finds it."""
        s, lay, host = self.spec, self.lay, self.host
        n = engine_slots(s)
        pods = [pod_name("sim", i) for i in range(n)]
        out: list[tuple[str, str, dict[str, str]]] = []
        groups = [[i] for i in range(n)] if sim_per_process(s) else [list(range(n))]
        for group in groups:
            first = group[0]
            name = pods[first] if len(group) == 1 else "sim"
            argv = command("sim") + self.argv("sim", {
                **self.engine_values(), "engines": len(group),
                "http_port": lay.engine_http[first], "kv_port": lay.engine_kv[first],
            }) + shlex.split(s.engine_args)
            ports: list[Port] = []
            links: dict[str, str] = {}
            for i in group:
                ports += [Port(lay.engine_http[i], f"engine {pods[i]} HTTP", "--engine-port"),
                          Port(lay.engine_kv[i], f"engine {pods[i]} KV events", "--kv-port"),
                          Port(lay.engine_kv[i] + 1, f"engine {pods[i]} KV replay",
                               "--kv-port")]
                url = f"http://{host}:{lay.engine_http[i]}"
                links[f"engine {pods[i]}"] = url
                out.append((pods[i], name, {
                    "engine_url": url, "kv_endpoint": f"tcp://{host}:{lay.engine_kv[i]}",
                    "replay_endpoint": f"tcp://{host}:{lay.engine_kv[i] + 1}"}))
            self.procs.append(ProcessSpec(
                name=name, kind="sim", argv=tuple(argv), env=ENGINE_ENV,
                ports=tuple(ports),
                health_url=f"http://{host}:{lay.engine_http[first]}/health",
                pods=tuple(pods[i] for i in group), links=links, watch=_watch("sim"),
            ))
        return out

    def agent(self, pod: str, values: dict[str, Any], after: tuple[str, ...],
              vllm_args: list[str] | None = None, env: Mapping[str, str] | None = None,
              links: Mapping[str, str] | None = None, extra_ports: tuple[Port, ...] = (),
              extra_flags: list[str] | None = None) -> None:
        port = self.ops_port()
        ports, _, ops_links = self.ops(port)
        argv = command("agent") + self.argv("agent", {
            **self.bus(), "pool": self.spec.pool, "pod": pod, "http_host": self.host,
            "http_port": port, **values}) + (extra_flags or [])
        if vllm_args is not None:
            argv += ["--", *vllm_args]
        self.procs.append(ProcessSpec(
            name=f"agent-{pod}", kind="agent", argv=tuple(argv),
            env={**(env or {}), **self.bus_env("agent", agent_user(pod))},
            after=(*self.nats_names(), *after), ports=(*extra_ports, *ports), pods=(pod,),
            links={**(links or {}), **ops_links}, watch=_watch("agent"),
        ))

    def vllm_agents(self) -> None:
        s, lay, host = self.spec, self.lay, self.host
        block = s.block_size or VLLM_CPU_BLOCK_SIZE
        if block % 32:
            raise ConfigError(
                f"block size {block} does not work with vLLM on the CPU: its attention backend "
                "needs a multiple of 32 (--block-size 32, 64, ...)")
        blocks = s.num_gpu_blocks or VLLM_NUM_GPU_BLOCKS
        if blocks * block < VLLM_MAX_MODEL_LEN:
            raise ConfigError(
                f"{blocks} KV blocks of {block} tokens hold fewer than vLLM's max model length "
                f"({VLLM_MAX_MODEL_LEN} tokens here): vLLM would refuse to start; give "
                f"--num-gpu-blocks {-(-VLLM_MAX_MODEL_LEN // block)} or more")
        command = s.vllm_command or str(ROOT / ".venv-vllm" / "bin" / "vllm")
        cache = self.state_dir / "vllm-cache"
        env = {**VLLM_ENV, **ENGINE_ENV, "VLLM_CACHE_ROOT": str(cache),
               "XDG_CACHE_HOME": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")}
        storage_values, storage_flags = self.vllm_storage()
        for i in range(engine_slots(s)):
            pod = pod_name("vllm", i)
            http, kv = lay.engine_http[i], lay.engine_kv[i]
            log = self.state_dir / "logs" / f"{pod}.log"
            self.agent(pod, {
                "role": engine_role(s, i),
                "launch_vllm": str(self.model_dir), "model": self.served_model(),
                "vllm_command": command,
                "vllm_port": http, "vllm_kv_port": kv, "vllm_replay_port": kv + 1,
                "vllm_log": str(log), **storage_values, **self.vllm_lora(),
            }, after=(), extra_flags=storage_flags, vllm_args=[
                "--block-size", str(block), *VLLM_ARGS, "--num-gpu-blocks-override",
                str(blocks), *shlex.split(s.engine_args),
            ], env=env, links={f"engine {pod}": f"http://{host}:{http}", "vLLM log": str(log)},
                extra_ports=(Port(http, f"engine {pod} HTTP", "--engine-port"),
                             Port(kv, f"engine {pod} KV events", "--kv-port"),
                             Port(kv + 1, f"engine {pod} KV replay", "--kv-port")))

    def vllm_lora(self) -> dict[str, Any]:
        """The agent's LoRA settings for a vLLM engine (none without ``loras``)."""
        s = self.spec
        if not s.loras:
            return {}
        values: dict[str, Any] = {
            "vllm_loras": [f"{n}={p}" for n, p in self.lora_modules().items()],
            "lora_dir": str(self.lora_dir), "vllm_lora_runtime_updating": True}
        if s.max_loras:
            values["vllm_max_loras"] = s.max_loras
        return values

    def served_model(self) -> str:
        """The name the engines serve the model under."""
        if self.spec.served_model_name:
            return self.spec.served_model_name
        return str(self.model_dir) if self.spec.model else DEFAULT_MODEL_NAME

    def services(self) -> None:
        s = self.spec
        counts = {"tokenizer": s.tokenizers, "indexer": s.indexers, "scheduler": s.schedulers}
        for kind in REPLICATED:
            if kind == "ingress":
                continue
            for j in range(counts[kind]):
                port = self.ops_port()
                ports, health, links = self.ops(port)
                values: dict[str, Any] = {**self.bus(), "http_host": self.host,
                                          "http_port": port}
                if kind == "tokenizer" and (s.model or s.served_model_name):
                    values["models"] = [f"{self.served_model()}={self.model_dir}"]
                self.procs.append(ProcessSpec(
                    name=f"{kind}-{j}", kind=kind,
                    argv=tuple(command(kind) + self.argv(kind, values)),
                    env=self.bus_env(kind, kind), after=self.nats_names(), ports=ports,
                    health_url=health, bus_service=BUS_SERVICE[kind], links=links,
                    watch=_watch(kind) + (("deploy/local/scheduler.yaml",)
                                          if kind == "scheduler" else ()),
                ))

    def autoscaler(self) -> None:
        """The autoscalers (``autoscale``), deciding the plan's pool from the start; one leads
        (the lease), the others follow."""
        nodes = len(self.lay.nats)
        for i in range(self.spec.autoscalers):
            port = self.ops_port()
            ports, health, links = self.ops(port)
            values: dict[str, Any] = {**self.bus(), "http_host": self.host, "http_port": port,
                                      "pools": [self.spec.pool]}
            if nodes >= 3:  # the lease outlives a node of the cluster
                values["lease_replicas"] = 3
            self.procs.append(ProcessSpec(
                name=f"autoscaler-{i}", kind="autoscaler",
                argv=tuple(command("autoscaler") + self.argv("autoscaler", values)),
                env=self.bus_env("autoscaler", "autoscaler"), after=self.nats_names(),
                ports=ports, health_url=health, links=links, watch=_watch("autoscaler"),
            ))

    def console(self) -> None:
        """The fleet console (``console``): a reader of the bus, serving its page."""
        for port in self.lay.console:
            url = f"http://{self.host}:{port}"
            values: dict[str, Any] = {**self.bus(), "http_host": self.host, "http_port": port}
            self.procs.append(ProcessSpec(
                name="console", kind="console",
                argv=tuple(command("console") + self.argv("console", values)),
                env=self.bus_env("console", "console"), after=self.nats_names(),
                ports=(Port(port, "fleet console", "--console-port"),),
                health_url=url + "/health",
                links={"console": url + "/console", "metrics": url + "/metrics"},
                watch=_watch("console"),
            ))

    def ingresses(self) -> None:
        s = self.spec
        after = tuple(p.name for p in self.procs if p.kind in BUS_SERVICE)
        scheme = "https" if s.ingress_tls_cert else "http"
        for j, port in enumerate(self.lay.ingress):
            values: dict[str, Any] = {**self.bus(), "pool": s.pool, "http_host": self.host,
                                      "http_port": port}
            if s.model or s.served_model_name:  # the prompts it tokenizes itself
                values["models"] = [f"{self.served_model()}={self.model_dir}"]
            # Its own scheduler replica decides as the scheduler service would.
            values.update({k: v for k, v in s.settings.get("scheduler", {}).items()
                           if k in SCHEDULING_FIELDS})
            if s.api_keys_file:
                values["api_keys_file"] = str(Path(s.api_keys_file).resolve())
            if s.ingress_tls_cert:
                values["tls_cert_file"] = str(Path(s.ingress_tls_cert).resolve())
                values["tls_key_file"] = str(Path(s.ingress_tls_key).resolve())
            url = f"{scheme}://{self.host}:{port}"
            self.procs.append(ProcessSpec(
                name=f"ingress-{j}", kind="ingress",
                argv=tuple(command("ingress") + self.argv("ingress", values)),
                env=self.bus_env("ingress", "ingress"), after=(*self.nats_names(), *after),
                ports=(Port(port, "OpenAI API", "--ingress-port"),),
                health_url=url + "/health",
                links={"OpenAI API": url + "/v1", "metrics": url + "/metrics"},
                watch=_watch("ingress"),
            ))


def plan(spec: SystemSpec, pick: Callable[[int], int] | None = None) -> SystemPlan:
    """Every process of ``spec``, in start order. Raises ConfigError (naming the service and
    the field) for a setting a service would refuse, before anything starts."""
    state_dir = Path(spec.state_dir).expanduser() if spec.state_dir else default_state_dir()
    state_dir = state_dir.resolve()
    model_dir = Path(spec.model).expanduser().resolve() if spec.model else default_model_dir()
    b = _Builder(spec, layout(spec, pick), state_dir, model_dir)
    b.nats()
    if spec.engine == "vllm":
        b.vllm_agents()
        pods = tuple(pod_name("vllm", i) for i in range(engine_slots(spec)))
    else:
        engines = b.sims()
        pods = tuple(pod for pod, _, _ in engines)
        lora = {"lora_dir": str(b.lora_dir)} if spec.loras else {}
        for i, (pod, sim, endpoints) in enumerate(engines):
            b.agent(pod, {**endpoints, "role": engine_role(spec, i), **lora}, after=(sim,))
    b.services()
    if spec.autoscale:
        b.autoscaler()
    b.console()
    b.ingresses()
    # Engine slots past `engines` (autoscale) are parked: laid out, not started.
    parked = set(pods[spec.engines:])
    procs = tuple(replace(p, parked=True) if p.pods and set(p.pods) <= parked else p
                  for p in b.procs)
    return SystemPlan(spec=spec, state_dir=state_dir, model_dir=model_dir,
                      served_model=b.served_model(),
                      nats_urls=b.nats_urls or tuple(spec.nats_url.split(",")), pods=pods,
                      processes=procs, layout=b.lay)
