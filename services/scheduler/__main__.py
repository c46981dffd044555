"""`infermesh scheduler`: run one scheduler replica."""

from __future__ import annotations

import argparse
import asyncio
import sys

from infermesh.libs.config import ConfigError, add_arguments, load_config
from infermesh.libs.telemetry import configure_logging
from infermesh.libs.telemetry.ops import run_until_stopped

from .config import SchedulerConfig
from .service import SchedulerService


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The scheduler's command line."""
    p = parser or argparse.ArgumentParser(prog="infermesh scheduler")
    p.description = "Run a scheduler replica: im.schedule over a plugin pipeline."
    p.add_argument("--config", help="YAML file with any of the options below")
    add_arguments(p, SchedulerConfig)
    return p


async def run(service: SchedulerService) -> None:
    """Run until SIGINT/SIGTERM."""
    await run_until_stopped(service.start, service.stop)


def main(argv: list[str] | None = None) -> int:
    """Entry point; a bad config or profiles file exits with status 2 and says what is wrong."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(
            SchedulerConfig, args, env_prefix="INFERMESH_SCHEDULER", file=args.config
        )
        service = SchedulerService(cfg)
    except ConfigError as e:
        print(f"infermesh scheduler: {e}", file=sys.stderr)
        return 2
    configure_logging("scheduler")
    asyncio.run(run(service))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
