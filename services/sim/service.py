"""The simulator process: its engines, one aiohttp server per engine (serving
:class:`~.app.EngineApp`, vLLM's OpenAI API) and their KV event publishers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from aiohttp import web

from infermesh.libs.telemetry import get_logger
from infermesh.libs.tokenization import ModelTokenizer

from .app import EngineApp
from .config import SimConfig
from .engine import SimEngine, sampling_vocab
from .kv_client import KVTransferClient
from .metrics import EngineMetrics, vllm_cache_config_labels
from .publisher import ZmqKVPublisher

log = get_logger("sim")


def process_age_s() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere 0)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError):
        return 0.0
    # Field 22 (starttime, clock ticks after boot) follows the command name in parentheses.
    fields = stat[stat.rindex(")") + 2:].split()
    return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))


@dataclass
class EngineEndpoints:
    """Where one engine serves."""

    index: int
    http: str
    kv: str
    replay: str
    topic: str


class SimService:
    """Every engine of this process, their HTTP servers and KV publishers."""

    def __init__(self, cfg: SimConfig) -> None:
        from infermesh.libs.tinymodel import DEFAULT_MODEL_NAME, ensure_model_folder

        self.cfg = cfg
        self.model_dir = Path(cfg.model) if cfg.model else ensure_model_folder()
        self.served_model_name = cfg.served_model_name or DEFAULT_MODEL_NAME
        self.tokenizer = ModelTokenizer.from_folder(self.model_dir,
                                                    max_model_len=cfg.max_model_len)
        self.vocab = sampling_vocab(self.tokenizer)
        self.ctx = zmq.asyncio.Context()
        self.engines: list[SimEngine] = []
        self.endpoints: list[EngineEndpoints] = []
        self._runners: list[web.AppRunner] = []
        self._kv_clients: list[KVTransferClient] = []

    async def start(self) -> None:
        """Start every engine and its HTTP server, after the modelled start-up delay."""
        cfg = self.cfg
        wait = cfg.startup_delay_s * cfg.time_scale - process_age_s()
        if wait > 0:
            # A booting vLLM does not answer yet: nothing listens until its start is over, so
            # an agent sees a refused connection (not ready), as it does for a launched vLLM.
            # vLLM's start is timed from its launch: this process's own start counts.
            log.info("sim_starting", wait_s=round(wait, 3))
            await asyncio.sleep(wait)
        for i in range(cfg.engines):
            http_port = cfg.http_port + i if cfg.http_port else 0
            sock = self._bind_http(http_port)
            port = sock.getsockname()[1]
            topic = cfg.kv_topic or f"kv@{cfg.http_host}:{port}@{self.served_model_name}"
            publisher = None
            kv = replay = ""
            if cfg.kv_events:
                kv_port = cfg.kv_port + 2 * i if cfg.kv_port else 0
                publisher, kv, replay = self._bind_zmq(kv_port, topic, cfg.kv_replay_port)
            metrics = EngineMetrics(
                self.served_model_name, i,
                vllm_cache_config_labels(
                    block_size=cfg.block_size, num_gpu_blocks=cfg.num_gpu_blocks,
                    num_cpu_blocks=cfg.num_cpu_blocks or None,
                    prefix_caching_hash_algo=cfg.hash_algo),
                max_model_len=cfg.max_model_len, enable_lora=cfg.lora_enabled(),
                kv_connector=cfg.kv_connector, storage_tier=bool(cfg.storage_dir))
            kv_client = None
            if cfg.kv_connector:
                kv_client = KVTransferClient(cfg.kv_transfer_timeout_s)
                self._kv_clients.append(kv_client)
            engine = SimEngine(cfg, i, self.served_model_name, self.vocab,
                               self.tokenizer.eos_token_id, metrics, publisher,
                               kv_address=(self._kv_host(), port), kv_client=kv_client,
                               model_path=str(self.model_dir))
            engine.start()
            await self._serve(EngineApp(self, engine, metrics), sock)
            self.engines.append(engine)
            self.endpoints.append(
                EngineEndpoints(i, f"http://{cfg.http_host}:{port}", kv, replay, topic))
        log.info("sim_started", engines=[e.__dict__ for e in self.endpoints],
                 model=self.served_model_name)

    def _kv_host(self) -> str:
        """The host decode engines reach this process's engines at (``remote_host``)."""
        cfg = self.cfg
        if cfg.kv_transfer_host:
            return cfg.kv_transfer_host
        if cfg.http_host in ("", "0.0.0.0", "::"):
            # Listening everywhere: name this machine, as a peer on another host needs.
            try:
                return socket.gethostbyname(socket.gethostname())
            except OSError:
                return "127.0.0.1"
        return cfg.http_host

    def _bind_http(self, port: int) -> socket.socket:
        # Bind before serving (port 0 → a free port) so the KV topic can name the real port.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.cfg.http_host, port))
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    async def _serve(self, app: EngineApp, sock: socket.socket) -> None:
        # handler_cancellation: a client that hangs up cancels its handler, which aborts the
        # request in the engine (as vLLM does); shutdown_timeout: stop promptly on SIGTERM.
        runner = web.AppRunner(app.app(), access_log=None, handle_signals=False,
                               handler_cancellation=True, shutdown_timeout=2.0)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runners.append(runner)

    def _bind_zmq(self, port: int, topic: str,
                  replay_port: int = 0) -> tuple[ZmqKVPublisher, str, str]:
        host = self.cfg.http_host
        replay_port = replay_port or (port + 1 if port else 0)
        pub_ep = f"tcp://{host}:{port}" if port else f"tcp://{host}:*"
        rep_ep = f"tcp://{host}:{replay_port}" if replay_port else f"tcp://{host}:*"
        pub = ZmqKVPublisher(self.ctx, pub_ep, rep_ep, topic=topic,
                             buffer_steps=self.cfg.replay_buffer_steps, bind=True)
        return pub, pub.endpoint, pub.replay_endpoint or ""

    @property
    def http_port(self) -> int | None:
        """Engine 0's HTTP port (the ready file's URL)."""
        if not self.endpoints:
            return None
        return int(self.endpoints[0].http.rsplit(":", 1)[1])

    def ready_detail(self) -> dict[str, Any]:
        """What the ready file tells about this process: the model and every engine's
        endpoints."""
        return {"model": self.served_model_name, "model_dir": str(self.model_dir),
                "engines": [e.__dict__ for e in self.endpoints]}

    async def stop(self) -> None:
        """Stop every engine (in-flight requests end), stop serving, close the sockets."""
        for e in self.engines:
            await e.stop()
        for c in self._kv_clients:
            with contextlib.suppress(Exception):
                await c.close()
        for r in self._runners:
            with contextlib.suppress(Exception):
                await r.cleanup()
        self.ctx.term()
