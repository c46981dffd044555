"""`infermesh agent`: run one agent for one engine."""

from __future__ import annotations

import argparse
import asyncio
import sys

from infermesh.libs.config import add_arguments, load_config
from infermesh.libs.telemetry import configure_logging
from infermesh.libs.telemetry.ops import run_until_stopped

from .agent import Agent
from .config import AgentConfig


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The agent's command line."""
    p = parser or argparse.ArgumentParser(prog="infermesh agent")
    p.description = "Run the vLLM worker agent: engine KV events and load → the bus."
    p.add_argument("--config", help="YAML file with any of the options below")
    add_arguments(p, AgentConfig)
    return p


async def run(cfg: AgentConfig) -> None:
    """Run until SIGINT/SIGTERM."""
    agent = Agent(cfg)
    await run_until_stopped(agent.start, agent.stop)


def main(argv: list[str] | None = None) -> int:
    """Entry point. Arguments after ``--`` go to ``vllm serve`` (with ``--launch-vllm``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    args = build_parser().parse_args(argv)
    if extra:
        args.vllm_args = extra
    cfg = load_config(AgentConfig, args, env_prefix="INFERMESH_AGENT", file=args.config)
    configure_logging("agent")
    asyncio.run(run(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
