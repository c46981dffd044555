"""vLLM's KV-cache event wire format (``vllm/distributed/kv_events.py``), decoded and encoded.

On the ZMQ PUB socket each message is three frames: ``topic``, ``seq`` (8-byte big-endian) and a
MessagePack payload, an EventBatch ``(ts, events, data_parallel_rank)``. Releases differ in shape:

* older releases encode the batch and every event positionally (arrays), the event's tag first;
* newer ones encode events as maps with a ``"type"`` key, and the batch as an array or a map;
* block hashes are unsigned 64-bit ints by default, raw hash bytes in older releases;
* fields are added over time, so trailing unknown fields are ignored and newer optional fields
  default to ``None``.

The decoder here turns any of these into the project's own events (``messages.BlockStored`` …),
the encoder writes what a real engine of either form writes (used by the simulator).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from .messages import (
    TIER_CPU,
    TIER_GPU,
    TIER_LOCAL_STORAGE,
    TIER_SHARED,
    AllBlocksCleared,
    AnyKVEvent,
    BlockRemoved,
    BlockStored,
)

EventForm = Literal["map", "array"]

# Replay protocol: a DEALER sends [b"", start_seq]; the engine answers one message per buffered
# batch and ends with this seq and an empty payload.
REPLAY_END_SEQ = b"\xff" * 8

_U64 = (1 << 64) - 1

ExternalHash = int | bytes


def hash_to_u64(h: int | bytes) -> int:
    """A block hash as the unsigned 64-bit int on the wire.

    Ints are taken modulo 2**64 (a signed value reads as its two's complement); raw hash bytes
    (older releases) fold to their last eight bytes, big-endian, as vLLM does for int hashes.
    """
    if isinstance(h, int):
        return h & _U64
    return int.from_bytes(h[-8:], "big")


def medium_to_tier(medium: str | None, locality: str | None = None) -> str:
    """vLLM's ``medium`` (and ``locality``) as one of our tiers; unknown media pass through
    upper-cased.

    Storage is shared by the pool (``SHARED_STORAGE``: any engine mounting the directory can
    load it) unless the engine says it is ``LOCAL`` to itself (``LOCAL_STORAGE``: a node's own
    disk, held by the pod). vLLM's secondary tiers leave ``locality`` unset unless configured,
    and are shared by default in the set-ups it documents (a shared filesystem or object store).
    """
    if medium is None:
        return TIER_GPU
    m = medium.upper()
    if m in (TIER_GPU, TIER_CPU):
        return m
    if m in (TIER_SHARED, "DISK", "SHARED", "STORAGE", "FS", TIER_LOCAL_STORAGE):
        if m == TIER_LOCAL_STORAGE or (locality is not None and locality.upper() == "LOCAL"):
            return TIER_LOCAL_STORAGE
        return TIER_SHARED
    return m


# ---- positional (array) form -------------------------------------------------------------


class _StoredA(msgspec.Struct, array_like=True, tag="BlockStored"):
    block_hashes: list[ExternalHash]
    parent_block_hash: ExternalHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None


class _RemovedA(msgspec.Struct, array_like=True, tag="BlockRemoved"):
    block_hashes: list[ExternalHash]
    medium: str | None = None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class _ClearedA(msgspec.Struct, array_like=True, tag="AllBlocksCleared"):
    pass


# ---- map form ----------------------------------------------------------------------------


class _StoredM(msgspec.Struct, tag_field="type", tag="BlockStored"):
    block_hashes: list[ExternalHash]
    token_ids: list[int]
    block_size: int
    parent_block_hash: ExternalHash | None = None
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class _RemovedM(msgspec.Struct, tag_field="type", tag="BlockRemoved"):
    block_hashes: list[ExternalHash]
    medium: str | None = None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class _ClearedM(msgspec.Struct, tag_field="type", tag="AllBlocksCleared"):
    pass


_EvA = _StoredA | _RemovedA | _ClearedA
_EvM = _StoredM | _RemovedM | _ClearedM


class _BatchAA(msgspec.Struct, array_like=True):
    ts: float
    events: list[_EvA]
    data_parallel_rank: int | None = None


class _BatchMA(msgspec.Struct):
    ts: float
    events: list[_EvA]
    data_parallel_rank: int | None = None


class _BatchAM(msgspec.Struct, array_like=True):
    ts: float
    events: list[_EvM]
    data_parallel_rank: int | None = None


class _BatchMM(msgspec.Struct):
    ts: float
    events: list[_EvM]
    data_parallel_rank: int | None = None


class VllmBatch(msgspec.Struct):
    """One decoded engine batch, already in the project's event schema."""

    ts: float
    events: list[AnyKVEvent]
    data_parallel_rank: int | None
    form: EventForm


class KVEventDecodeError(ValueError):
    """A payload that is none of the known forms of vLLM's EventBatch."""


def _is_array(payload: bytes) -> bool:
    """Whether a MessagePack value starts with an array header (fixarray, array16, array32)."""
    if not payload:
        return False
    b = payload[0]
    return 0x90 <= b <= 0x9F or b in (0xDC, 0xDD)


class VllmEventDecoder:
    """Decodes vLLM EventBatch payloads of any known form; remembers the event form last seen.

    The batch's own shape (array or map) is read off its first byte; one engine always sends one
    event form, so the remembered form decodes in a single pass and the other is tried only when
    it fails.
    """

    def __init__(self) -> None:
        self._decoders: dict[tuple[bool, EventForm], msgspec.msgpack.Decoder[Any]] = {
            (True, "map"): msgspec.msgpack.Decoder(_BatchAM),
            (False, "map"): msgspec.msgpack.Decoder(_BatchMM),
            (True, "array"): msgspec.msgpack.Decoder(_BatchAA),
            (False, "array"): msgspec.msgpack.Decoder(_BatchMA),
        }
        self._order: list[EventForm] = ["map", "array"]

    def decode(self, payload: bytes) -> VllmBatch:
        """Decode one payload; raise :class:`KVEventDecodeError` if no form fits."""
        errors = []
        batch_array = _is_array(payload)
        for form in self._order:
            try:
                raw = self._decoders[(batch_array, form)].decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                errors.append(f"{form} events: {e}")
                continue
            if form != self._order[0]:
                self._order.reverse()
            return VllmBatch(
                ts=raw.ts,
                events=[_normalise(e) for e in raw.events],
                data_parallel_rank=raw.data_parallel_rank,
                form=form,
            )
        raise KVEventDecodeError("not a vLLM KV event batch (" + "; ".join(errors) + ")")


def _u64_list(hashes: list[int | bytes]) -> list[int]:
    """The hashes as uint64s; the common case (already uint64 ints) costs two C-level scans."""
    try:
        if not hashes or (min(hashes) >= 0 and max(hashes) <= _U64):  # type: ignore[type-var,operator]
            return hashes  # type: ignore[return-value]
    except TypeError:  # bytes, or ints mixed with bytes
        pass
    return [hash_to_u64(h) for h in hashes]


def _normalise(e: Any) -> AnyKVEvent:
    if isinstance(e, (_StoredA, _StoredM)):
        parent = e.parent_block_hash
        return BlockStored(
            block_hashes=_u64_list(e.block_hashes),
            parent_hash=None if parent is None else hash_to_u64(parent),
            token_ids=e.token_ids,
            block_size=e.block_size,
            tier=medium_to_tier(e.medium, e.locality),
            lora_name=e.lora_name,
            extra_keys=e.extra_keys,
        )
    if isinstance(e, (_RemovedA, _RemovedM)):
        return BlockRemoved(
            block_hashes=_u64_list(e.block_hashes),
            tier=medium_to_tier(e.medium, e.locality),
        )
    return AllBlocksCleared()


# ---- encoding (what an engine writes) ----------------------------------------------------


class _WStoredM(msgspec.Struct, tag="BlockStored", omit_defaults=True):
    block_hashes: list[ExternalHash]
    parent_block_hash: ExternalHash | None
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


class _WRemovedM(msgspec.Struct, tag="BlockRemoved", omit_defaults=True):
    block_hashes: list[ExternalHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class _WClearedM(msgspec.Struct, tag="AllBlocksCleared", omit_defaults=True):
    pass


class _WStoredA(msgspec.Struct, tag="BlockStored", array_like=True, omit_defaults=True):
    block_hashes: list[ExternalHash]
    parent_block_hash: ExternalHash | None
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


class _WRemovedA(msgspec.Struct, tag="BlockRemoved", array_like=True, omit_defaults=True):
    block_hashes: list[ExternalHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class _WClearedA(msgspec.Struct, tag="AllBlocksCleared", array_like=True, omit_defaults=True):
    pass


class EngineEvent(msgspec.Struct):
    """An event as the simulator produces it, before choosing a wire form."""

    kind: Literal["stored", "removed", "cleared"]
    block_hashes: list[ExternalHash] = []
    parent_block_hash: ExternalHash | None = None
    token_ids: list[int] = []
    block_size: int = 0
    medium: str | None = TIER_GPU
    lora_id: int | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    locality: str | None = None  # LOCAL or REMOTE (offload tiers); None: unspecified
    ownership: str | None = None  # the secondary tier that emitted it, if one did


class VllmEventEncoder:
    """Writes EventBatch payloads the way a vLLM engine of the chosen form does.

    ``map``: the batch as an array ``[ts, events, dp_rank]`` with each event a map tagged by
    ``"type"`` (what vLLM 0.32 was seen to send); ``array``: events positional, tag first.
    """

    def __init__(self, form: EventForm = "map") -> None:
        self.form = form
        self._enc = msgspec.msgpack.Encoder()

    def encode(self, ts: float, events: list[EngineEvent], dp_rank: int | None = 0) -> bytes:
        """One payload for ``events``."""
        out: list[Any] = []
        array = self.form == "array"
        for e in events:
            if e.kind == "stored":
                cls: Any = _WStoredA if array else _WStoredM
                out.append(
                    cls(
                        block_hashes=e.block_hashes,
                        parent_block_hash=e.parent_block_hash,
                        token_ids=e.token_ids,
                        block_size=e.block_size,
                        lora_id=e.lora_id,
                        medium=e.medium,
                        lora_name=e.lora_name,
                        extra_keys=e.extra_keys,
                        group_idx=None if array and e.locality is None else 0,
                        locality=e.locality,
                        ownership=e.ownership,
                    )
                )
            elif e.kind == "removed":
                cls = _WRemovedA if array else _WRemovedM
                out.append(
                    cls(
                        block_hashes=e.block_hashes,
                        medium=e.medium,
                        group_idx=None if array and e.locality is None else 0,
                        locality=e.locality,
                        ownership=e.ownership,
                    )
                )
            else:
                out.append(_WClearedA() if array else _WClearedM())
        return self._enc.encode((ts, out, dp_rank))
