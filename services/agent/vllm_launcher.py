"""The agent's own vLLM engine: start ``vllm serve`` with KV events wired up, keep it running.

With ``--launch-vllm MODEL`` the agent owns its engine, as a sidecar would in a pod: it picks the
engine's HTTP, KV-event and replay ports, adds ``--kv-events-config`` (a ZMQ publisher that binds,
a replay endpoint, a topic naming the engine), restarts the engine when it dies (with backoff),
and stops it with the agent.

With role ``prefill`` or ``decode`` the engine also gets vLLM's NIXL connector, set up for the
CPU (``kv_buffer_device: cpu``), and a side-channel port of its own: a prefill engine keeps a
request's KV blocks after answering, and the decode engine pulls them over NIXL with the
``kv_transfer_params`` of the prefill's answer (docs/vllm.md, "Prefill/decode with NIXL").

With a storage dir (:class:`StorageTier`) the engine gets vLLM's OffloadingConnector with
infermesh's tiering spec instead (``infermesh.libs.vllm_ext``): a CPU tier, and below it the
shared directory every engine of the pool reads and writes (docs/storage-tier.md). The agent
names the engine's offload region after its pod (vLLM's ``engine_id``) so that it can remove
the ``/dev/shm`` file an engine that died leaves behind, before it starts the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from infermesh.libs import vllm_ext
from infermesh.libs.process.ports import free_port
from infermesh.libs.process.process import die_with_parent, group_alive
from infermesh.libs.telemetry import get_logger

from .nixl_hook import ENV as PROGRESS_THREAD_ENV

log = get_logger("agent.vllm")

Role = Literal["both", "prefill", "decode"]
# vLLM's KV-transfer role per P/D role: the prefill engine only produces KV, the decode engine
# only consumes it ("both" engines get no connector).
KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}


def kv_transfer_config(role: Role, *, kv_lease_s: int = 0) -> dict[str, Any] | None:
    """vLLM's ``--kv-transfer-config`` for a P/D role (None for ``both``): NixlConnector over CPU
    memory, the prefill's KV lease when one is given."""
    if role == "both":
        return None
    cfg: dict[str, Any] = {
        "kv_connector": "NixlConnector",
        "kv_role": KV_ROLES[role],
        # The CPU platform has no device memory: NIXL registers the KV cache where it lives.
        "kv_buffer_device": "cpu",
    }
    if kv_lease_s and role == "prefill":
        cfg["kv_connector_extra_config"] = {"kv_lease_duration": kv_lease_s}
    return cfg


@dataclass(frozen=True)
class StorageTier:
    """The launched engine's shared-storage KV tier (the agent's ``--vllm-storage-*``)."""

    root_dir: str
    capacity_bytes: int = 0
    cpu_bytes: int = 512 << 20
    locality: str = "REMOTE"

    def kv_transfer_config(self, engine_id: str) -> dict[str, Any]:
        """vLLM's ``--kv-transfer-config`` for this tier, the offload region named ``engine_id``."""
        return vllm_ext.kv_transfer_config(
            self.root_dir, cpu_bytes=self.cpu_bytes, capacity_bytes=self.capacity_bytes,
            locality=self.locality, engine_id=engine_id)


def remove_offload_regions(engine_id: str, shm_dir: str = vllm_ext.SHM_DIR) -> list[str]:
    """Remove the ``/dev/shm`` offload regions of the engine called ``engine_id`` (left by one
    that was killed: vLLM unlinks them on a clean exit only); the paths removed."""
    removed: list[str] = []
    for pattern in vllm_ext.shm_region_names(engine_id):
        for path in Path(shm_dir).glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(str(path))
    return removed


@dataclass(frozen=True)
class LoraSettings:
    """The launched engine's LoRA adapters (the agent's ``--vllm-*lora*`` and ``--lora-dir``).

    Adapters come three ways: ``modules`` at start (``--lora-modules``); while it runs, by
    ``POST /v1/load_lora_adapter`` (and leave by ``/v1/unload_lora_adapter``) with runtime
    updating on; and on demand from ``lora_dir``, whose ``<name>`` folder vLLM's filesystem
    resolver loads the first time a request names ``<name>`` (also needs runtime updating).
    """

    modules: tuple[tuple[str, str], ...] = ()
    max_loras: int = 4
    max_lora_rank: int = 16
    lora_dir: str = ""
    runtime_updating: bool = True

    def args(self) -> list[str]:
        """The ``vllm serve`` flags."""
        out = ["--enable-lora", "--max-loras", str(self.max_loras),
               "--max-lora-rank", str(self.max_lora_rank)]
        if self.modules:
            out += ["--lora-modules", *(f"{n}={p}" for n, p in self.modules)]
        return out

    def environ(self) -> dict[str, str]:
        """What the engine's environment needs: runtime updating, the resolver's directory."""
        env: dict[str, str] = {}
        if self.runtime_updating:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
            if self.lora_dir:
                env["VLLM_LORA_RESOLVER_CACHE_DIR"] = self.lora_dir
        return env


@dataclass
class VllmPorts:
    """Where the launched engine serves; fixed for the agent's lifetime (restarts reuse them)."""

    http: int
    kv: int
    replay: int
    nixl: int = 0  # NIXL side channel (prefill/decode engines only; 0: none)

    @classmethod
    def pick(cls, http: int = 0, kv: int = 0, replay: int = 0,
             nixl: int | None = None) -> VllmPorts:
        """Use the given ports, and free ones where 0; ``nixl`` None: no side channel."""
        return cls(http or free_port(), kv or free_port(), replay or free_port(),
                   0 if nixl is None else nixl or free_port())


class VllmProcess:
    """One supervised ``vllm serve`` process."""

    def __init__(
        self,
        command: str,
        model: str,
        served_model_name: str,
        ports: VllmPorts,
        extra_args: list[str],
        *,
        host: str = "127.0.0.1",
        log_path: str | None = None,
        env: dict[str, str] | None = None,
        max_backoff_s: float = 30.0,
        role: Role = "both",
        nixl_host: str = "",
        kv_lease_s: int = 0,
        nixl_progress_thread: bool = False,
        storage: StorageTier | None = None,
        engine_id: str = "",
        hash_seed: str = "",
        lora: LoraSettings | None = None,
    ) -> None:
        self.command = command
        self.model = model
        self.served_model_name = served_model_name
        self.ports = ports
        self.extra_args = extra_args
        self.host = host
        self.log_path = log_path
        self.env = env or {}
        self.max_backoff_s = max_backoff_s
        self.role = role
        self.nixl_host = nixl_host or host
        self.kv_lease_s = kv_lease_s
        self.nixl_progress_thread = nixl_progress_thread
        self.storage = storage
        # The offload region's name (vLLM's engine_id): one per engine, stable across restarts.
        self.engine_id = engine_id or f"infermesh-{ports.http}"
        self.hash_seed = hash_seed
        self.lora = lora
        self.shm_dir = vllm_ext.SHM_DIR
        if role != "both" and not ports.nixl:
            raise ValueError(f"a {role} engine needs a NIXL side-channel port")
        if role != "both" and storage is not None:
            raise ValueError(f"a {role} engine cannot have a storage tier (one KV connector)")
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        """The engine's HTTP base URL."""
        return f"http://{self.host}:{self.ports.http}"

    @property
    def kv_endpoint(self) -> str:
        """Where the agent's SUB socket connects."""
        return f"tcp://{self.host}:{self.ports.kv}"

    @property
    def replay_endpoint(self) -> str:
        """Where the agent asks for replays."""
        return f"tcp://{self.host}:{self.ports.replay}"

    def argv(self) -> list[str]:
        """The full ``vllm serve`` command line."""
        events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            # vLLM binds only when the endpoint has a wildcard ("bind stable, connect volatile"):
            # the engine is the stable side, the agent connects.
            "endpoint": f"tcp://*:{self.ports.kv}",
            "replay_endpoint": f"tcp://*:{self.ports.replay}",
            "topic": f"kv@{self.host}:{self.ports.http}@{self.served_model_name}",
        }
        argv = [
            self.command, "serve", self.model,
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.ports.http),
            "--enable-prefix-caching",
            "--kv-events-config", json.dumps(events),
        ]
        if self.lora is not None:
            argv += self.lora.args()
        transfer = (self.storage.kv_transfer_config(self.engine_id) if self.storage is not None
                    else kv_transfer_config(self.role, kv_lease_s=self.kv_lease_s))
        # A --kv-transfer-config among the extra arguments is the operator's choice: it wins.
        if transfer is not None and not _has_flag(self.extra_args, "--kv-transfer-config"):
            argv += ["--kv-transfer-config", json.dumps(transfer)]
        return [*argv, *self.extra_args]

    def environ(self) -> dict[str, str]:
        """What the engine's environment adds to the agent's: the given ``env``, and for a P/D
        role the NIXL side channel (vLLM binds its handshake listener on that host and port, and
        a prefill engine advertises the same pair to decode engines), and whether NIXL may run
        its UCX progress thread (nixl_hook.py says why not)."""
        env = dict(self.env)
        if self.role != "both":
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = self.nixl_host
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(self.ports.nixl)
            env[PROGRESS_THREAD_ENV] = "1" if self.nixl_progress_thread else "0"
        if self.lora is not None:
            env.update(self.lora.environ())
        if self.hash_seed:  # else the agent's own, or "0" (_spawn)
            env["PYTHONHASHSEED"] = self.hash_seed
        return env

    async def start(self) -> None:
        """Start the engine and the supervisor that restarts it when it dies."""
        await self._spawn()
        self._task = asyncio.create_task(self._supervise(), name="vllm-supervisor")

    def _clean_offload_regions(self) -> None:
        if self.storage is None:
            return
        removed = remove_offload_regions(self.engine_id, self.shm_dir)
        if removed:
            log.warning("vllm_offload_region_removed", paths=removed,
                        why="left by an engine that did not exit cleanly")

    async def _spawn(self) -> None:
        # A region left by a killed engine would be joined, not recreated, by the next one.
        self._clean_offload_regions()
        env = {**os.environ, **self.environ()}
        # Reproducible block hashes across restarts (vLLM derives the first parent from it).
        env.setdefault("PYTHONHASHSEED", "0")
        out: Any = asyncio.subprocess.DEVNULL
        if self.log_path:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv(), env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            # Its own group (stopped whole); and it dies with this agent, even a killed one.
            start_new_session=True, preexec_fn=die_with_parent(),
        )
        if not isinstance(out, int):
            out.close()
        log.info("vllm_started", pid=self.proc.pid, url=self.url, restarts=self.restarts,
                 role=self.role, nixl_port=self.ports.nixl or None, log=self.log_path or None)

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping:
            assert self.proc is not None
            started = time.monotonic()
            code = await self.proc.wait()
            if self._stopping:
                return
            log.warning("vllm_exited", code=code, restarts=self.restarts)
            # The API server's engine-core children can outlive it and keep the KV ports bound;
            # a new engine could not start until they are gone.
            await _reap_group(self.proc.pid)
            self._clean_offload_regions()
            if time.monotonic() - started > 60:
                backoff = 1.0  # it ran a while: not a crash loop
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
            if self._stopping:
                return
            self.restarts += 1
            await self._spawn()

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the engine's process group; SIGKILL it after ``timeout``."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        await _reap_group(proc.pid)
        self._clean_offload_regions()
        log.info("vllm_stopped", code=proc.returncode)


def _has_flag(args: list[str], flag: str) -> bool:
    """Whether ``args`` give ``flag`` (``--flag VALUE``, ``--flag=VALUE``, or vLLM's dotted
    ``--flag.field VALUE``)."""
    return any(a == flag or a.startswith((flag + "=", flag + ".")) for a in args)


async def _reap_group(pgid: int, grace_s: float = 5.0) -> None:
    """End whatever is left of an engine's process group: SIGTERM, then SIGKILL after a grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_alive(pgid):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + grace_s
        while group_alive(pgid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    if group_alive(pgid):
        log.warning("vllm_group_survived", pgid=pgid)
