"""Block keys: the project's own 64-bit names for full KV blocks, independent of any engine.

A prompt's key chain is ``k[i] = xxh3_64(tokens of block i ‖ extra keys of block i, seed=k[i-1])``
with ``k[-1] = xxh3_64(model name)``. Tokens are packed as little-endian uint32. The extra keys of
a block are what vLLM publishes in ``BlockStored.extra_keys`` for it (the LoRA name, the cache
salt on the first block, …), so the indexer (from events) and the tokenizer (from a request)
compute the same keys, whatever hash algorithm or seed the engines use.

The tokenizer and the indexer both use this module, and nothing else computes keys.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from typing import Any

import xxhash

_xxh = xxhash.xxh3_64_intdigest


def model_seed(model: str) -> int:
    """The parent key of every first block of ``model``."""
    return _xxh(model.encode())


def _extra_bytes(extra: Iterable[Any] | None) -> bytes:
    if not extra:
        return b""
    return b"\x00" + b"\x00".join(str(x).encode() for x in extra)


def block_extra(index: int, *, lora_name: str | None = None,
                cache_salt: str | None = None) -> tuple[Any, ...] | None:
    """The extra keys of block ``index`` of a request, in vLLM's published (untagged) form."""
    keys: list[Any] = []
    if lora_name:
        keys.append(lora_name)
    if index == 0 and cache_salt:
        keys.append(cache_salt)
    return tuple(keys) if keys else None


def key(parent: int, token_ids: Sequence[int], extra: Iterable[Any] | None = None) -> int:
    """The key of one full block whose parent block has key ``parent``."""
    data = array("I", token_ids).tobytes()
    return _xxh(data + _extra_bytes(extra) if extra else data, seed=parent)


def prompt_keys(
    model: str,
    token_ids: Sequence[int],
    block_size: int,
    *,
    lora_name: str | None = None,
    cache_salt: str | None = None,
) -> list[int]:
    """Keys of every full block of a token sequence (a trailing partial block has none)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = len(token_ids) // block_size
    if n == 0:
        return []
    packed = memoryview(array("I", token_ids[: n * block_size]).tobytes())
    step = 4 * block_size
    parent = model_seed(model)
    out = []
    lora_extra = _extra_bytes((lora_name,)) if lora_name else b""
    for i in range(n):
        chunk = packed[i * step : (i + 1) * step]
        if i == 0 and cache_salt:
            parent = _xxh(bytes(chunk) + _extra_bytes(block_extra(0, lora_name=lora_name,
                                                                  cache_salt=cache_salt)),
                          seed=parent)
        elif lora_extra:
            parent = _xxh(bytes(chunk) + lora_extra, seed=parent)
        else:
            parent = _xxh(chunk, seed=parent)
        out.append(parent)
    return out
