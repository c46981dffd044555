"""`infermesh schema export DIR`: one JSON Schema per bus message, for tool authors."""

from __future__ import annotations

import argparse
from pathlib import Path

from infermesh.proto.codec import export_schemas


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="infermesh schema", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True)
    ex = sub.add_parser("export", help="write <Message>.schema.json files into DIR")
    ex.add_argument("dir", type=Path)
    args = p.parse_args(argv)
    for path in export_schemas(args.dir):
        print(path)
    return 0
