"""`infermesh up`: the whole system on one machine, on the embedded defaults.

Starts an embedded nats-server, one simulator process with N engines, one agent process per
engine, and every other service that exists; prints what runs where; restarts a child that dies;
stops everything cleanly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import nats

from infermesh.libs.bus import NatsServer, connect
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
    p.add_argument("--pool", default="default", help="pool name of the engines")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="bus subject prefix")
    p.add_argument("--block-size", type=int, default=16, help="KV block size of the engines")
    p.add_argument("--num-gpu-blocks", type=int, default=29_000, help="KV blocks per engine")
    p.add_argument("--time-scale", type=float, default=1.0, help="sim latency time scale")
    p.add_argument("--state-dir", default="", help="where ready files and logs go (default: temp)")
    p.add_argument("--ready-timeout", type=float, default=240.0,
                   help="seconds to wait for startup (real vLLM engines take ~40 s)")
    p.add_argument(
        "--exit-after-ready",
        action="store_true",
        help="stop everything once all is up (a smoke test)",
    )
    return p


async def _wait_heartbeats(url: str, prefix: str, pods: set[str], timeout: float) -> None:
    nc = await connect(url, "up-watch")
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


async def _wait_services(url: str, kinds: tuple[str, ...], timeout: float) -> None:
    """Wait until a NATS micro service of each kind answers ``$SRV.PING``."""
    nc = await connect(url, "up-watch")
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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
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
    args: argparse.Namespace, nats_url: str, model_dir: Path, state: Path, children: list[Child]
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
            env=env,
        )
        agent.start()
        children.append(agent)
    return DEFAULT_MODEL_NAME


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    configure_logging("up")
    from infermesh.libs.tinymodel import ensure_model_folder

    model_dir = ensure_model_folder()
    state = Path(args.state_dir or tempfile.mkdtemp(prefix="infermesh-up-"))
    state.mkdir(parents=True, exist_ok=True)
    nats = NatsServer(args.nats_port or None)
    nats.start()
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
            served = _start_vllm_agents(args, nats.url, model_dir, state, children)
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
                )
                agent.start()
                children.append(agent)
        bus = ["--nats-url", nats.url, "--subject-prefix", args.prefix]
        for name in ("tokenizer", "indexer"):
            c = Child(name, _py(f"infermesh.services.{name}", *bus, "--http-port", "-1"))
            c.start()
            children.append(c)
        scheduler = Child(
            "scheduler", _py("infermesh.services.scheduler", *bus, "--http-port", "-1")
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
            ),
        )
        ingress.start()
        children += [scheduler, ingress]
        asyncio.run(_wait_heartbeats(nats.url, args.prefix, pods, args.ready_timeout))
        asyncio.run(
            _wait_services(nats.url, ("tokenizer", "indexer", "scheduler"), args.ready_timeout)
        )
        ingress_url = f"http://127.0.0.1:{args.ingress_port}"
        _wait_http(f"{ingress_url}/health", ingress, args.ready_timeout)
        print("\ninfermesh is up", flush=True)
        print(
            f"  OpenAI API      {ingress_url}/v1  (ingress; header x-infermesh-endpoint "
            "names the engine)"
        )
        print(f"  nats            {nats.url}  (monitor http://127.0.0.1:{nats.monitor_port})")
        for line in engine_lines:
            print(line)
        print(f"  agents          {len(pods)} (heartbeats on {args.prefix}.pod.{args.pool}.*)")
        print(
            "  services        tokenizer, indexer, scheduler (profiles: "
            "deploy/local/scheduler.yaml)"
        )
        print(f"  model           {served}  from {model_dir}")
        print(f"  watch the bus:  infermesh events tail '{args.prefix}.>' --nats-url {nats.url}")
        print("Ctrl-C stops everything.\n", flush=True)
        if args.exit_after_ready:
            return 0
        while not stopping:
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
