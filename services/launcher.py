"""`infermesh up`: the whole system on one machine, on the embedded defaults.

Starts an embedded nats-server (or a routed cluster of them), one simulator process with N
engines, one agent process per engine, and every other service that exists; prints what runs
where; restarts a child (or a nats node) that dies; stops everything cleanly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import nats

from infermesh.libs.bus import (
    BusAuth,
    ClientSecurity,
    NatsCluster,
    NatsServer,
    ServerTLS,
    connect,
    write_bus_auth,
)
from infermesh.libs.bus.security import OBSERVER, agent_user, server_config
from infermesh.libs.telemetry import configure_logging, get_logger
from infermesh.proto import codec
from infermesh.proto.messages import PodState
from infermesh.proto.subjects import DEFAULT_PREFIX, Subjects

log = get_logger("up")


@dataclass
class Child:
    """A supervised child process."""

    name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        """Start (or restart) the process in its own process group."""
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            self.args, env=env, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def alive(self) -> bool:
        """Whether the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def build_parser() -> argparse.ArgumentParser:
    """The command line of `infermesh up`."""
    p = argparse.ArgumentParser(
        prog="infermesh up",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--engines", type=int, default=4, help="engines (default 4)")
    p.add_argument(
        "--engine",
        choices=["sim", "vllm"],
        default="sim",
        help="simulated engines, or real vLLM (CPU) launched by the agents",
    )
    p.add_argument(
        "--vllm-gpu-blocks",
        type=int,
        default=512,
        help="KV blocks per real vLLM engine (--num-gpu-blocks-override)",
    )
    p.add_argument("--nats-port", type=int, default=4222, help="NATS client port (0: free port)")
    p.add_argument(
        "--nats-cluster",
        type=int,
        default=1,
        help="NATS nodes: 1 runs one nats-server; N > 1 a routed cluster on client ports "
        "--nats-port + i, and every service gets every node's URL",
    )
    p.add_argument(
        "--sim-port",
        type=int,
        default=8100,
        help="HTTP port of engine 0; engine i uses +i (0: free ports)",
    )
    p.add_argument(
        "--kv-port",
        type=int,
        default=5557,
        help="ZMQ PUB port of engine 0; engine i uses +2i, its replay socket +1",
    )
    p.add_argument("--ingress-port", type=int, default=8000, help="port of the OpenAI API")
    p.add_argument(
        "--api-keys-file",
        default="",
        help="named API keys with rate limits for the OpenAI API (docs/ingress.md); "
        "INFERMESH_INGRESS_API_KEY also works",
    )
    p.add_argument("--ingress-tls-cert", default="", help="PEM certificate: serve the API on HTTPS")
    p.add_argument("--ingress-tls-key", default="", help="PEM key of --ingress-tls-cert")
    p.add_argument("--pool", default="default", help="pool name of the engines")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="bus subject prefix")
    p.add_argument("--block-size", type=int, default=16, help="KV block size of the engines")
    p.add_argument("--num-gpu-blocks", type=int, default=29_000, help="KV blocks per engine")
    p.add_argument("--time-scale", type=float, default=1.0, help="sim latency time scale")
    p.add_argument("--state-dir", default="", help="where ready files and logs go (default: temp)")
    p.add_argument(
        "--no-nats-auth",
        dest="nats_auth",
        action="store_false",
        help="run NATS without users and permissions (by default every service gets its own "
        "identity; docs/security.md)",
    )
    p.add_argument("--nats-tls-cert", default="", help="PEM certificate: NATS clients must use TLS")
    p.add_argument("--nats-tls-key", default="", help="PEM key of --nats-tls-cert")
    p.add_argument(
        "--nats-tls-ca",
        default="",
        help="CA the services verify the NATS certificate with (default: the system CAs)",
    )
    p.add_argument("--ready-timeout", type=float, default=240.0,
                   help="seconds to wait for startup (real vLLM engines take ~40 s)")
    p.add_argument(
        "--exit-after-ready",
        action="store_true",
        help="stop everything once all is up (a smoke test)",
    )
    return p


async def _wait_heartbeats(
    url: str, prefix: str, pods: set[str], timeout: float,
    security: ClientSecurity | None = None,
) -> None:
    nc = await connect(url, "up-watch", security=security)
    seen: set[str] = set()
    done = asyncio.Event()

    async def on_msg(msg: object) -> None:
        try:
            st = codec.decode(msg.data, PodState)  # type: ignore[attr-defined]
        except codec.DecodeError:
            return
        if st.ready:
            seen.add(st.pod)
        if pods <= seen:
            done.set()

    await nc.subscribe(Subjects(prefix).pod_state_all, cb=on_msg)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await nc.close()


async def _wait_services(
    url: str, kinds: tuple[str, ...], timeout: float, security: ClientSecurity | None = None
) -> None:
    """Wait until a NATS micro service of each kind answers ``$SRV.PING``."""
    nc = await connect(url, "up-watch", security=security)
    found: set[str] = set()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish("$SRV.PING", b"", reply=inbox)
            with contextlib.suppress(asyncio.TimeoutError, nats.errors.TimeoutError):
                while True:
                    m = await sub.next_msg(timeout=0.2)
                    name = json.loads(m.data).get("name", "")
                    found |= {k for k in kinds if k in name}
            await sub.unsubscribe()
            if found >= set(kinds):
                return
        raise TimeoutError(f"services not up within {timeout}s: {sorted(set(kinds) - found)}")
    finally:
        await nc.close()


def _wait_http(url: str, child: Child, timeout: float) -> None:
    # Our own child on loopback: its certificate may be self-signed, so it is not verified.
    ctx = ssl._create_unverified_context() if url.startswith("https:") else None  # noqa: S323
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1, context=ctx) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{child.name} not ready within {timeout}s")


def _wait_file(path: Path, child: Child, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        if not child.alive():
            raise RuntimeError(f"{child.name} exited before it was ready")
        time.sleep(0.05)
    raise TimeoutError(f"{child.name} not ready within {timeout}s")


ROOT = Path(__file__).resolve().parents[1]

# `vllm serve` flags for the tiny model on CPU (docs/vllm.md says why each is there).
VLLM_ARGS = [
    "--block-size",
    "32",  # the CPU attention backend needs multiples of 32
    "--max-model-len",
    "2048",
    "--max-num-seqs",
    "16",
    "--enforce-eager",
    "--enable-prompt-tokens-details",
]
VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_SERVER_DEV_MODE": "1",  # POST /reset_prefix_cache
    "PYTHONHASHSEED": "0",
}


def _start_vllm_agents(
    args: argparse.Namespace, nats_url: str, model_dir: Path, state: Path, children: list[Child],
    bus: BusSetup | None = None,
) -> str:
    """One agent per engine, each launching and supervising its own `vllm serve`."""
    from infermesh.libs.tinymodel import DEFAULT_MODEL_NAME

    vllm = ROOT / ".venv-vllm" / "bin" / "vllm"
    if not vllm.exists():
        raise SystemExit(f"{vllm} is missing: run `make vllm-env` (make up ENGINE=vllm does)")
    cache = state / "vllm-cache"
    env = {
        **VLLM_ENV,
        "VLLM_CACHE_ROOT": str(cache),
        "XDG_CACHE_HOME": str(cache),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
    }
    for i in range(args.engines):
        pod = f"vllm-{i}"
        agent = Child(
            f"agent {pod}",
            _py(
                "infermesh.services.agent",
                "--nats-url",
                nats_url,
                "--pool",
                args.pool,
                "--pod",
                pod,
                "--subject-prefix",
                args.prefix,
                "--launch-vllm",
                str(model_dir),
                "--model",
                DEFAULT_MODEL_NAME,
                "--vllm-command",
                str(vllm),
                "--vllm-port",
                str(args.sim_port + i),
                "--vllm-kv-port",
                str(args.kv_port + 2 * i),
                "--vllm-replay-port",
                str(args.kv_port + 2 * i + 1),
                "--vllm-log",
                str(state / f"{pod}.log"),
                "--",
                *VLLM_ARGS,
                "--num-gpu-blocks-override",
                str(args.vllm_gpu_blocks),
            ),
            env={**env, **(bus.env("agent", agent_user(pod)) if bus else {})},
        )
        agent.start()
        children.append(agent)
    return DEFAULT_MODEL_NAME


def _ingress_args(args: argparse.Namespace) -> list[str]:
    """The ingress flags for API keys and HTTPS (paths made absolute)."""
    if bool(args.ingress_tls_cert) != bool(args.ingress_tls_key):
        raise SystemExit("--ingress-tls-cert and --ingress-tls-key go together")
    out: list[str] = []
    if args.api_keys_file:
        out += ["--api-keys-file", str(Path(args.api_keys_file).resolve())]
    if args.ingress_tls_cert:
        out += ["--tls-cert-file", str(Path(args.ingress_tls_cert).resolve()),
                "--tls-key-file", str(Path(args.ingress_tls_key).resolve())]
    return out


def _start_nats(
    args: argparse.Namespace, config_file: str | None = None
) -> NatsServer | NatsCluster:
    """One nats-server, or a cluster of ``--nats-cluster`` routed nodes; started and healthy.

    ``config_file`` (users, permissions, TLS: see :func:`_bus_setup`) is every node's config.
    """
    if args.nats_cluster < 1:
        raise SystemExit("--nats-cluster must be at least 1")
    if args.nats_cluster == 1:
        return NatsServer(args.nats_port or None, config_file=config_file).start()
    n = args.nats_cluster
    ports = [args.nats_port + i for i in range(n)] if args.nats_port else None
    return NatsCluster(n, ports=ports, include=config_file).start()


def _nats_lines(nats: NatsServer | NatsCluster) -> list[str]:
    """The summary's lines about the bus: every node's client URL and monitor."""
    if isinstance(nats, NatsServer):
        return [f"  nats            {nats.url}  (monitor http://127.0.0.1:{nats.monitor_port})"]
    lines = [f"  nats            {len(nats.nodes)}-node cluster '{nats.name}' (services get every "
             "URL and reconnect to a surviving node)"]
    for i, node in enumerate(nats.nodes):
        lines.append(f"    node {i:<10} {node.url}  (monitor {nats.monitor_url(i)}, "
                     f"routes :{nats.cluster_ports[i]})")
    return lines


def _revive_nats(nats: NatsServer | NatsCluster) -> None:
    """Restart a nats node that died, on its own ports (its peers and clients find it there)."""
    try:
        if isinstance(nats, NatsServer):
            if nats.proc is None or nats.proc.poll() is not None:
                log.warning("nats_restarting", url=nats.url)
                nats.start()
            return
        for i, node in enumerate(nats.nodes):
            if not nats.alive(i):
                log.warning("nats_node_restarting", node=i, url=node.url)
                nats.start_node(i)
    except (OSError, RuntimeError, TimeoutError) as e:
        log.error("nats_restart_failed", error=str(e))  # tried again on the next round


@dataclass(frozen=True)
class BusSetup:
    """The bus's security for one `infermesh up`: the server config and each child's identity."""

    config_file: str | None = None
    auth: BusAuth | None = None
    tls_ca: str = ""

    def env(self, service: str, user: str | None = None) -> dict[str, str]:
        """Environment of a child of ``service`` running as ``user`` (default: the service).

        File paths only: passwords never appear in a command line or an environment.
        """
        pre = f"INFERMESH_{service.upper()}_"
        out: dict[str, str] = {}
        if self.auth is not None:
            out[pre + "NATS_CREDENTIALS"] = str(self.auth.credentials_file(user or service))
        if self.tls_ca:
            out[pre + "NATS_TLS_CA"] = self.tls_ca
        return out

    def security(self, user: str = OBSERVER) -> ClientSecurity | None:
        """Client options for the launcher's own connections."""
        if self.auth is not None:
            return self.auth.client(user)
        return ClientSecurity(tls_ca=self.tls_ca) if self.tls_ca else None

    def tail_flags(self) -> str:
        """The `events tail` flags that get the observer onto this bus."""
        flags = ""
        if self.auth is not None:
            flags += f" --nats-credentials {self.auth.credentials_file(OBSERVER)}"
        if self.tls_ca:
            flags += f" --nats-tls-ca {self.tls_ca}"
        return flags


def _bus_setup(args: argparse.Namespace, state: Path) -> BusSetup:
    """Write the bus's users, permissions and TLS settings into ``state/bus`` (0600 files)."""
    if bool(args.nats_tls_cert) != bool(args.nats_tls_key):
        raise SystemExit("--nats-tls-cert and --nats-tls-key go together")
    tls = None
    if args.nats_tls_cert:
        tls = ServerTLS(str(Path(args.nats_tls_cert).resolve()),
                        str(Path(args.nats_tls_key).resolve()))
    ca = str(Path(args.nats_tls_ca).resolve()) if args.nats_tls_ca else ""
    if args.nats_auth:
        name = "vllm" if args.engine == "vllm" else "sim"
        pods = [(args.pool, f"{name}-{i}") for i in range(args.engines)]
        auth = write_bus_auth(state, args.prefix, pods, tls=tls, tls_ca=ca)
        return BusSetup(str(auth.config_file), auth, ca)
    if tls is not None:
        conf = state / "bus" / "nats-tls.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(server_config(None, tls=tls))
        return BusSetup(str(conf), None, ca)
    return BusSetup()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    configure_logging("up")
    from infermesh.libs.tinymodel import ensure_model_folder

    model_dir = ensure_model_folder()
    state = Path(args.state_dir or tempfile.mkdtemp(prefix="infermesh-up-"))
    state.mkdir(parents=True, exist_ok=True)
    bus_setup = _bus_setup(args, state)
    nats = _start_nats(args, bus_setup.config_file)
    children: list[Child] = []
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        ready_file = state / "sim.json"
        sim: Child | None = None
        pods: set[str] = set()
        engine_lines: list[str] = []
        if args.engine == "vllm":
            served = _start_vllm_agents(args, nats.url, model_dir, state, children, bus_setup)
            pods = {f"vllm-{i}" for i in range(args.engines)}
            engine_lines = [
                f"  engine vllm-{i:<3} http://127.0.0.1:{args.sim_port + i}  (real vLLM; log "
                f"{state / f'vllm-{i}.log'})"
                for i in range(args.engines)
            ]
        else:
            ready_file.unlink(missing_ok=True)
            sim = Child(
                "sim",
                _py(
                    "infermesh.services.sim",
                    "--engines",
                    str(args.engines),
                    "--port",
                    str(args.sim_port),
                    "--kv-port",
                    str(args.kv_port),
                    "--model",
                    str(model_dir),
                    "--block-size",
                    str(args.block_size),
                    "--num-gpu-blocks",
                    str(args.num_gpu_blocks),
                    "--time-scale",
                    str(args.time_scale),
                    "--ready-file",
                    str(ready_file),
                ),
            )
            sim.start()
            children.append(sim)
            info = _wait_file(ready_file, sim, args.ready_timeout)
            served = str(info.get("model"))
            engines = info["engines"]
            assert isinstance(engines, list)
            for e in engines:
                pod = f"sim-{e['index']}"
                pods.add(pod)
                engine_lines.append(
                    f"  engine {pod:<9} {e['http']}  (OpenAI API; KV events {e['kv']})"
                )
                agent = Child(
                    f"agent {pod}",
                    _py(
                        "infermesh.services.agent",
                        "--nats-url",
                        nats.url,
                        "--pool",
                        args.pool,
                        "--pod",
                        pod,
                        "--engine-url",
                        e["http"],
                        "--kv-endpoint",
                        e["kv"],
                        "--replay-endpoint",
                        e["replay"],
                        "--subject-prefix",
                        args.prefix,
                    ),
                    env=bus_setup.env("agent", agent_user(pod)),
                )
                agent.start()
                children.append(agent)
        bus = ["--nats-url", nats.url, "--subject-prefix", args.prefix]
        for name in ("tokenizer", "indexer"):
            c = Child(name, _py(f"infermesh.services.{name}", *bus, "--http-port", "-1"),
                      env=bus_setup.env(name))
            c.start()
            children.append(c)
        scheduler = Child(
            "scheduler", _py("infermesh.services.scheduler", *bus, "--http-port", "-1"),
            env=bus_setup.env("scheduler"),
        )
        scheduler.start()
        ingress = Child(
            "ingress",
            _py(
                "infermesh.services.ingress",
                *bus,
                "--pool",
                args.pool,
                "--port",
                str(args.ingress_port),
                *_ingress_args(args),
            ),
            env=bus_setup.env("ingress"),
        )
        ingress.start()
        children += [scheduler, ingress]
        watch = bus_setup.security()
        asyncio.run(_wait_heartbeats(nats.url, args.prefix, pods, args.ready_timeout, watch))
        asyncio.run(_wait_services(nats.url, ("tokenizer", "indexer", "scheduler"),
                                   args.ready_timeout, watch))
        scheme = "https" if args.ingress_tls_cert else "http"
        ingress_url = f"{scheme}://127.0.0.1:{args.ingress_port}"
        _wait_http(f"{ingress_url}/health", ingress, args.ready_timeout)
        print("\ninfermesh is up", flush=True)
        print(
            f"  OpenAI API      {ingress_url}/v1  (ingress; header x-infermesh-endpoint "
            "names the engine)"
        )
        for line in _nats_lines(nats):
            print(line)
        for line in engine_lines:
            print(line)
        print(f"  agents          {len(pods)} (heartbeats on {args.prefix}.pod.{args.pool}.*)")
        print(
            "  services        tokenizer, indexer, scheduler (profiles: "
            "deploy/local/scheduler.yaml)"
        )
        print(f"  model           {served}  from {model_dir}")
        print(f"  watch the bus:  infermesh events tail '{args.prefix}.>' --nats-url {nats.url}"
              f"{bus_setup.tail_flags()}")
        if bus_setup.auth is not None:
            print(f"  bus security    one NATS user per service, credentials in "
                  f"{bus_setup.auth.config_file.parent} (docs/security.md)")
        print("Ctrl-C stops everything.\n", flush=True)
        if args.exit_after_ready:
            return 0
        while not stopping:
            _revive_nats(nats)
            for c in children:
                if not c.alive() and not stopping:
                    c.restarts += 1
                    log.warning("child_restarting", child=c.name, restarts=c.restarts)
                    if c is sim:
                        ready_file.unlink(missing_ok=True)
                    c.start()
            time.sleep(0.2)
        return 0
    finally:
        for c in reversed(children):
            c.stop()
        nats.stop()
        print("infermesh stopped", flush=True)
