"""`infermesh indexer`: run one indexer replica."""

from __future__ import annotations

import argparse
import asyncio
import gc

from infermesh.libs.config import add_arguments, load_config
from infermesh.libs.telemetry import configure_logging
from infermesh.libs.telemetry.ops import run_until_stopped

from .config import IndexerConfig
from .indexer import Indexer


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The indexer's command line."""
    p = parser or argparse.ArgumentParser(prog="infermesh indexer")
    p.description = "Run the KV-cache indexer: every pod's KV events → block index → lookups."
    p.add_argument("--config", help="YAML file with any of the options below")
    add_arguments(p, IndexerConfig)
    return p


async def run(cfg: IndexerConfig) -> None:
    """Run until SIGINT/SIGTERM."""
    indexer = Indexer(cfg)

    async def start() -> None:
        await indexer.start()
        # What exists now lives as long as the process: keep it out of every collection, so
        # the pauses that land on lookups only scan the garbage of recent messages.
        gc.collect()
        gc.freeze()

    await run_until_stopped(start, indexer.stop)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    cfg = load_config(IndexerConfig, args, env_prefix="INFERMESH_INDEXER", file=args.config)
    configure_logging("indexer")
    asyncio.run(run(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
