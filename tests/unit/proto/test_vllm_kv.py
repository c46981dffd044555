"""The KV-event decoder accepts every form vLLM has sent; the encoder writes what vLLM writes."""

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from infermesh.proto.messages import AllBlocksCleared, BlockRemoved, BlockStored
from infermesh.proto.vllm_kv import (
    EngineEvent,
    KVEventDecodeError,
    VllmEventDecoder,
    VllmEventEncoder,
    hash_to_u64,
    medium_to_tier,
)

BIG = 2**64 - 1


def test_map_form_of_vllm_032() -> None:
    # vLLM 0.32: the batch positional, each event a map with a "type" key, newer fields present.
    payload = msgspec.msgpack.encode(
        [
            1700000000.5,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [BIG, 7],
                    "parent_block_hash": 3,
                    "token_ids": [1, 2, 3, 4],
                    "block_size": 2,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": None,
                    "extra_keys": [None, None],
                    "group_idx": 0,
                    "session_id": "abc",
                    "a_field_from_the_future": {"x": 1},
                },
                {"type": "BlockRemoved", "block_hashes": [7, -1], "medium": "CPU", "group_idx": 0},
                {"type": "AllBlocksCleared"},
            ],
            0,
        ]
    )
    b = VllmEventDecoder().decode(payload)
    assert b.form == "map" and b.data_parallel_rank == 0
    st_, rm, cl = b.events
    assert isinstance(st_, BlockStored) and st_.block_hashes == [BIG, 7]
    assert st_.parent_hash == 3 and st_.token_ids == [1, 2, 3, 4] and st_.tier == "GPU"
    assert isinstance(rm, BlockRemoved) and rm.tier == "CPU"
    assert rm.block_hashes == [7, BIG]  # a signed int reads as its two's complement
    assert isinstance(cl, AllBlocksCleared)


def test_positional_form_with_bytes_hashes_and_short_arrays() -> None:
    h1 = bytes(range(32))
    payload = msgspec.msgpack.encode(
        [
            1.0,
            [
                ["BlockStored", [h1], None, [5, 6], 2, None],  # old release: no medium field
                ["BlockRemoved", [h1]],
                ["AllBlocksCleared"],
            ],
        ]
    )
    b = VllmEventDecoder().decode(payload)
    assert b.form == "array" and b.data_parallel_rank is None
    assert b.events[0].block_hashes == [int.from_bytes(h1[-8:], "big")]
    assert b.events[0].tier == "GPU"
    assert b.events[1].block_hashes == b.events[0].block_hashes


def test_batch_as_map() -> None:
    payload = msgspec.msgpack.encode(
        {"ts": 2.0, "events": [{"type": "AllBlocksCleared"}], "data_parallel_rank": 1}
    )
    b = VllmEventDecoder().decode(payload)
    assert b.data_parallel_rank == 1 and isinstance(b.events[0], AllBlocksCleared)


@pytest.mark.parametrize("form", ["map", "array"])
def test_encoder_round_trip(form: str) -> None:
    enc = VllmEventEncoder(form)  # type: ignore[arg-type]
    p = enc.encode(
        3.0,
        [
            EngineEvent("stored", [BIG, 1], 9, [1, 2, 3, 4], 2, "CPU", lora_name="a"),
            EngineEvent("removed", [1], medium="GPU"),
            EngineEvent("cleared"),
        ],
    )
    raw = msgspec.msgpack.decode(p)
    assert isinstance(raw, list) and len(raw) == 3
    first = raw[1][0]
    if form == "map":
        assert first["type"] == "BlockStored" and first["medium"] == "CPU"
    else:
        assert first[0] == "BlockStored" and first[1] == [BIG, 1]
    b = VllmEventDecoder().decode(p)
    assert b.form == form
    assert b.events[0].lora_name == "a" and b.events[0].tier == "CPU"


def test_u64_and_tiers() -> None:
    assert hash_to_u64(-1) == BIG
    assert hash_to_u64(b"\x01" * 32) == int.from_bytes(b"\x01" * 8, "big")
    assert medium_to_tier(None) == "GPU"
    assert medium_to_tier("cpu") == "CPU"
    assert medium_to_tier("STORAGE") == "SHARED_STORAGE"
    assert medium_to_tier("STORAGE", "REMOTE") == "SHARED_STORAGE"
    assert medium_to_tier("STORAGE", "local") == "LOCAL_STORAGE"
    assert medium_to_tier("CPU", "LOCAL") == "CPU"


def test_offload_events_of_vllm_032_with_locality() -> None:
    """vLLM 0.32's offloading connector: a placeholder BlockStored per tier (no tokens, block
    size 0) with ``locality``/``ownership``, and a removal from storage; written with vLLM's own
    field layout (tests/integration/vllm_reference.py mirrors it)."""
    from tests.integration import vllm_reference as ref

    events = [
        ref.BlockStored(block_hashes=[5, 6], parent_block_hash=None, token_ids=[],
                        block_size=0, lora_id=None, medium="CPU", lora_name=None),
        ref.BlockStored(block_hashes=[5, 6], parent_block_hash=None, token_ids=[],
                        block_size=0, lora_id=None, medium="STORAGE", lora_name=None,
                        locality="REMOTE", ownership="fs", session_id="req-1"),
        ref.BlockStored(block_hashes=[7], parent_block_hash=6, token_ids=[1, 2],
                        block_size=2, lora_id=None, medium="STORAGE", lora_name=None,
                        locality="LOCAL"),
        ref.BlockRemoved(block_hashes=[5], medium="STORAGE", locality="REMOTE"),
    ]
    payload = msgspec.msgpack.encode(ref.KVEventBatch032(ts=1.0, events=events))
    got = VllmEventDecoder().decode(payload).events
    assert [type(e).__name__ for e in got] == ["BlockStored"] * 3 + ["BlockRemoved"]
    assert [e.tier for e in got] == ["CPU", "SHARED_STORAGE", "LOCAL_STORAGE", "SHARED_STORAGE"]
    assert got[1].token_ids == [] and got[1].block_hashes == [5, 6]
    assert got[2].parent_hash == 6


@pytest.mark.parametrize("form", ["map", "array"])
def test_encoder_writes_locality(form: str) -> None:
    enc = VllmEventEncoder(form)  # type: ignore[arg-type]
    p = enc.encode(2.0, [
        EngineEvent("stored", [9], medium="STORAGE", locality="REMOTE", ownership="infermesh"),
        EngineEvent("removed", [9], medium="STORAGE", locality="LOCAL"),
    ])
    got = VllmEventDecoder().decode(p).events
    assert [e.tier for e in got] == ["SHARED_STORAGE", "LOCAL_STORAGE"]
    if form == "map":
        from tests.integration import vllm_reference as ref

        batch = msgspec.msgpack.decode(p, type=ref.KVEventBatch032)
        assert batch.events[0].locality == "REMOTE" and batch.events[0].ownership == "infermesh"
        assert batch.events[1].locality == "LOCAL"


@given(st.binary(max_size=200))
def test_garbage_raises_only_decode_error(data: bytes) -> None:
    d = VllmEventDecoder()
    try:
        d.decode(data)
    except KVEventDecodeError:
        pass


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=5),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
        max_leaves=20,
    )
)
def test_wrong_shapes_raise_only_decode_error(obj: object) -> None:
    try:
        VllmEventDecoder().decode(msgspec.msgpack.encode(obj))
    except KVEventDecodeError:
        pass
