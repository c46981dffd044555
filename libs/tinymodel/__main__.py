"""``python -m infermesh.libs.tinymodel [DEST]``: build the tiny model folder."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .build import DEFAULT_SEED, DEFAULT_VOCAB_SIZE, build_model_folder, default_model_dir, is_built


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the folder and print its path."""
    parser = argparse.ArgumentParser(
        prog="python -m infermesh.libs.tinymodel",
        description="Build the deterministic tiny Llama-style model folder.",
    )
    parser.add_argument("dest", nargs="?", type=Path, default=None,
                        help="target folder (default: %(prog)s's default model dir)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    dest = args.dest if args.dest is not None else default_model_dir()
    fresh = not is_built(dest, vocab_size=args.vocab_size, seed=args.seed)
    start = time.perf_counter()
    path = build_model_folder(dest, vocab_size=args.vocab_size, seed=args.seed)
    took = time.perf_counter() - start
    state = f"built in {took:.2f}s" if fresh else "already up to date"
    print(f"{path} ({state})", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
