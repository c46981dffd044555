"""`infermesh tokenizer`: serve ``im.tokenize`` for the configured models."""

from __future__ import annotations

import argparse
import asyncio
import sys

from infermesh.libs.config import ConfigError, add_arguments, load_config
from infermesh.libs.telemetry import configure_logging
from infermesh.libs.telemetry.ops import run_until_stopped
from infermesh.libs.tokenization import TokenizationError

from .config import TokenizerConfig
from .service import TokenizerService


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The tokenizer's command line."""
    p = parser or argparse.ArgumentParser(prog="infermesh tokenizer")
    p.description = "Run the tokenizer service: prompt or chat → token count and block keys."
    p.add_argument("--config", help="YAML file with any of the options below")
    add_arguments(p, TokenizerConfig)
    return p


async def run(cfg: TokenizerConfig) -> None:
    """Run until SIGINT/SIGTERM."""
    svc = TokenizerService(cfg)
    # Load the models before anything listens, so a bad folder fails the start loudly.
    svc.load_models()
    await run_until_stopped(svc.start, svc.stop)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(TokenizerConfig, args, env_prefix="INFERMESH_TOKENIZER",
                          file=args.config)
    except ConfigError as e:
        print(f"infermesh tokenizer: {e}", file=sys.stderr)
        return 2
    configure_logging("tokenizer")
    try:
        asyncio.run(run(cfg))
    except TokenizationError as e:
        print(f"infermesh tokenizer: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
