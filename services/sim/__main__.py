"""`infermesh sim`: run N simulated vLLM engines in one process."""

from __future__ import annotations

import argparse
import asyncio
import signal

from infermesh.libs.config import add_arguments, load_config
from infermesh.libs.telemetry import configure_logging

from .config import SimConfig
from .server import SimServer


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The simulator's command line."""
    p = parser or argparse.ArgumentParser(prog="infermesh sim")
    p.description = (
        "Run simulated vLLM engines: OpenAI API, /metrics with vLLM's names, KV events on ZMQ."
    )
    p.add_argument("--config", help="YAML file with any of the options below")
    p.add_argument("--ready-file", default="",
                   help="write the engines' endpoints as JSON here once all are serving")
    add_arguments(p, SimConfig)
    return p


async def run(cfg: SimConfig, ready_file: str) -> None:
    """Serve until SIGINT/SIGTERM."""
    server = SimServer(cfg)
    await server.start()
    if ready_file:
        server.write_ready_file(ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    cfg = load_config(SimConfig, args, env_prefix="INFERMESH_SIM", file=args.config)
    configure_logging("sim")
    asyncio.run(run(cfg, args.ready_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
