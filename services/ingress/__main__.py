"""`infermesh ingress`: the OpenAI-compatible front door."""

from __future__ import annotations

import argparse
import asyncio
import sys

from infermesh.libs.config import ConfigError, add_arguments, load_config
from infermesh.libs.telemetry import configure_logging
from infermesh.libs.telemetry.ops import run_until_stopped

from .config import IngressConfig
from .service import Ingress


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ingress's command line."""
    p = parser or argparse.ArgumentParser(prog="infermesh ingress")
    p.description = "Serve the OpenAI API and route every request to the best engine."
    p.add_argument("--config", help="YAML file with any of the options below")
    add_arguments(p, IngressConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; a bad config, key file or certificate exits with status 2 and says why."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(IngressConfig, args, env_prefix="INFERMESH_INGRESS", file=args.config)
        ingress = Ingress(cfg)
    except ConfigError as e:
        print(f"infermesh ingress: {e}", file=sys.stderr)
        return 2
    configure_logging("ingress")
    asyncio.run(run_until_stopped(ingress.start, ingress.stop))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
