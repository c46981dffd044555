"""JSON bytes for every body the simulator sends (msgspec, with a fallback for odd strings)."""

from __future__ import annotations

import json
from typing import Any

import msgspec

__all__ = ["ENCODER", "NULL", "to_json"]

ENCODER = msgspec.json.Encoder()
NULL = b"null"


def to_json(value: Any) -> bytes:
    """Compact JSON; strings with lone surrogates (not UTF-8) fall back to escaped ASCII."""
    try:
        return ENCODER.encode(value)
    except UnicodeEncodeError:
        return json.dumps(msgspec.to_builtins(value), separators=(",", ":")).encode()
