"""An independent reader of vLLM's KV events, written from vLLM's own struct definitions.

It shares no code with ``infermesh.proto.vllm_kv``: it mirrors ``vllm/distributed/kv_events.py``
as msgspec declares it there, so a test that decodes our simulator's output with it checks the
simulator against vLLM's definitions rather than against our own decoder.

* vLLM 0.32: ``EventBatch`` is ``array_like``; ``KVCacheEvent`` is ``tag=True`` (a map with a
  ``"type"`` key holding the class name); block hashes ``bytes | int``.
* Older releases: events ``array_like`` too, so each event is ``[tag, field, ...]``.
"""

from __future__ import annotations

from typing import Any

import msgspec

Hash = bytes | int


class Batch032(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class Event032(msgspec.Struct, omit_defaults=True, tag=True):
    pass


class BlockStored(Event032):
    block_hashes: list[Hash]
    parent_block_hash: Hash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(Event032):
    block_hashes: list[Hash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(Event032):
    pass


class KVEventBatch032(Batch032):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


class OldEvent(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
    pass


class OldBlockStored(OldEvent, tag="BlockStored"):
    block_hashes: list[Hash]
    parent_block_hash: Hash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class OldBlockRemoved(OldEvent, tag="BlockRemoved"):
    block_hashes: list[Hash]
    medium: str | None = None
    group_idx: int | None = None


class OldAllBlocksCleared(OldEvent, tag="AllBlocksCleared"):
    pass


class KVEventBatchOld(Batch032):
    events: list[OldBlockStored | OldBlockRemoved | OldAllBlocksCleared]


DECODERS = {
    "map": msgspec.msgpack.Decoder(KVEventBatch032),
    "array": msgspec.msgpack.Decoder(KVEventBatchOld),
}


def decode(payload: bytes, form: str) -> Any:
    """Decode one payload of the given form (raises on anything else)."""
    return DECODERS[form].decode(payload)


def kind(ev: Any) -> str:
    """The vLLM class name of a decoded event."""
    return type(ev).__name__.removeprefix("Old")
