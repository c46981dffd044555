"""The one way a service process runs: flags from its config dataclass, config errors as exit
status 2, structured logging, SIGINT/SIGTERM, a ready file, and no life beyond its parent's.

A service's ``__main__.py`` is a call to :func:`service_main`; what differs between services is
their config class and the object built from it, which has ``async start()`` and
``async stop()`` (and may have ``http_port`` and ``ready_detail()`` for the ready file).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from infermesh.libs.config import ConfigError, add_arguments, load_config
from infermesh.libs.telemetry import (
    configure_logging,
    get_logger,
    setup_from_env,
    shutdown_tracing,
)

C = TypeVar("C")

# How long a service may take to stop (drain its bus connection, close its servers).
STOP_TIMEOUT_S = 5.0



class Runnable(Protocol):
    """What a service object offers the runner."""

    async def start(self) -> Any: ...

    async def stop(self) -> Any: ...


class StartupError(Exception):
    """Raised by a service's start when its configuration cannot work (a missing model folder,
    an unreadable file): the runner prints it and exits with status 2."""


def build_parser(prog: str, description: str, config: type[Any]) -> argparse.ArgumentParser:
    """``--config``, ``--ready-file`` and one flag per config field (with its default)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="YAML file with any of the options below")
    p.add_argument("--ready-file", default="",
                   help="write a JSON ready file here once serving (pid, URL, endpoints)")
    add_arguments(p, config)
    return p


async def _serve(name: str, service: Runnable, ready_file: str) -> None:
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if done.is_set():  # a second signal: the caller will not wait for a clean stop
            _exit_now(1)
        done.set()

    # Handled from the start: a stop asked for while starting (a bus that is not there yet, an
    # engine still booting) ends the start instead of waiting for it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    starting = asyncio.ensure_future(service.start())
    signalled = asyncio.ensure_future(done.wait())
    await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        await asyncio.wait({starting}, timeout=STOP_TIMEOUT_S)
    else:
        starting.result()  # a failed start raises here (StartupError: exit status 2)
        # What exists now lives as long as the process: keep it out of every collection, so
        # the pauses that land on requests only scan the garbage of recent work.
        gc.collect()
        gc.freeze()
        if ready_file:
            _write_ready_file(name, service, ready_file)
        await signalled
    # A clean stop drains the bus connection; with the bus gone that can wait forever (and
    # swallow a cancellation), and a process told to stop must stop.
    stopping = asyncio.ensure_future(service.stop())
    finished, _ = await asyncio.wait({stopping}, timeout=STOP_TIMEOUT_S)
    if not finished:
        get_logger("runtime").warning("stop_timed_out", service=name, timeout_s=STOP_TIMEOUT_S)
        _exit_now(1)
    stopping.result()
    await _end_stragglers(name)


def _write_ready_file(name: str, service: Runnable, path: str) -> None:
    from infermesh.libs.process.ready import ReadyFile, write_ready_file

    port = getattr(service, "http_port", None)
    scheme = getattr(service, "http_scheme", "http")
    host = getattr(getattr(service, "cfg", None), "http_host", "127.0.0.1")
    detail = service.ready_detail() if hasattr(service, "ready_detail") else {}
    write_ready_file(path, ReadyFile(
        service=name, pid=os.getpid(), started=time.time(),
        http_url=f"{scheme}://{host}:{port}" if port else "", detail=detail))


async def _end_stragglers(name: str) -> None:
    """Cancel what the service left running. A task that ignores its cancellation (nats-py's
    reconnect loop with the server gone, say) would keep ``asyncio.run`` waiting forever: the
    process exits without it."""
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not me]
    for t in left:
        t.cancel()
    if not left:
        return
    _, pending = await asyncio.wait(left, timeout=STOP_TIMEOUT_S)
    if pending:
        get_logger("runtime").info("tasks_abandoned_at_exit", service=name,
                                   tasks=sorted(t.get_name() for t in pending))
        _exit_now(0)


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


class ServiceMain:
    """The ``main(argv)`` of one service (``infermesh <name>``, env ``INFERMESH_<NAME>_*``)."""

    def __init__(self, name: str, config: type[Any], build: Callable[[Any], Runnable],
                 description: str, passthrough: str = "") -> None:
        self.name = name
        self.prog = f"infermesh {name}"
        self.config = config
        self.build = build
        self.description = description
        self.passthrough = passthrough

    def parser(self) -> argparse.ArgumentParser:
        """The command line: ``--config``, ``--ready-file`` and one flag per config field."""
        return build_parser(self.prog, self.description, self.config)

    def __call__(self, argv: list[str] | None = None) -> int:
        """Run until SIGINT/SIGTERM; 2 (with the reason on stderr) for a bad configuration."""
        args_in = list(sys.argv[1:] if argv is None else argv)
        extra: list[str] = []
        if self.passthrough and "--" in args_in:
            at = args_in.index("--")
            args_in, extra = args_in[:at], args_in[at + 1:]
        args = self.parser().parse_args(args_in)
        if extra:
            setattr(args, self.passthrough, extra)
        try:
            cfg = load_config(self.config, args, env_prefix=f"INFERMESH_{self.name.upper()}",
                              file=args.config)
            service = self.build(cfg)
        except (ConfigError, StartupError) as e:
            print(f"{self.prog}: {e}", file=sys.stderr)
            return 2
        configure_logging(self.name)
        setup_from_env(f"infermesh-{self.name}")  # spans to OTLP when OTEL_* ask for it
        try:
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                runner.run(_serve(self.name, service, args.ready_file))
        except StartupError as e:
            print(f"{self.prog}: {e}", file=sys.stderr)
            return 2
        finally:
            shutdown_tracing()
        return 0


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop (libuv: measurably less CPU per bus message and HTTP request than
    asyncio's own), unless ``INFERMESH_EVENT_LOOP=asyncio`` asks for the standard one."""
    if os.environ.get("INFERMESH_EVENT_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a dependency; kept optional for odd platforms
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def service_main(name: str, config: type[C], build: Callable[[C], Runnable], description: str,
                 *, passthrough: str = "") -> ServiceMain:
    """The entry point of service ``name``; ``passthrough`` names a list field that receives
    every argument after ``--`` (the agent hands them to ``vllm serve``)."""
    return ServiceMain(name, config, build, description, passthrough)
