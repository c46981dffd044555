"""The simulator's block hasher against vectors computed by real vLLM.

``vllm_hash_vectors.json`` is written by ``gen_vllm_hash_vectors.py`` running vLLM's own
hashing code (vLLM 0.32.0); these tests need no vLLM installation.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from infermesh.services.sim.block_hash import (
    DEFAULT_NONE_HASH_SEED,
    BlockHasher,
    block_extra_keys,
    event_extra_keys,
    hash_object,
    none_hash,
    to_wire,
    to_wire_bytes,
)

VECTORS_PATH = Path(__file__).with_name("vllm_hash_vectors.json")
U64 = 2**64


@cache
def vectors() -> dict[str, Any]:
    return json.loads(VECTORS_PATH.read_text(encoding="utf-8"))


def _jsonable(obj: Any) -> Any:
    # Same encoding the generator uses for extra keys.
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, bytes):
        return {"bytes": obj.hex()}
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    raise TypeError(type(obj).__name__)


def _seed_entries() -> list[tuple[str | None, str, dict[str, Any]]]:
    return [
        (seed["pythonhashseed"], algo, entry)
        for seed in vectors()["seeds"]
        for algo, entry in seed["algos"].items()
    ]


def _case_groups() -> list[Any]:
    groups: dict[tuple[str | None, str, int, str], list[dict[str, Any]]] = {}
    for seed, algo, entry in _seed_entries():
        for case in entry["cases"]:
            key = (seed, algo, case["block_size"], case["variant"])
            groups.setdefault(key, []).append(case)
    return [
        pytest.param(*key, cases, id=f"seed={key[0]}-{key[1]}-bs{key[2]}-{key[3]}")
        for key, cases in groups.items()
    ]


def test_vectors_come_from_real_vllm() -> None:
    v = vectors()
    assert v["vllm_version"].startswith("0.32")
    assert set(v["algos"]) == {"sha256", "sha256_cbor"}
    assert set(v["block_sizes"]) == {16, 32}
    seeds = {s["pythonhashseed"] for s in v["seeds"]}
    assert {"0", "12345", None} <= seeds
    variants = v["variants"]
    assert any(x["lora_name"] and not x["cache_salt"] for x in variants.values())
    assert any(x["cache_salt"] and not x["lora_name"] for x in variants.values())
    assert any(x["cache_salt"] and x["lora_name"] for x in variants.values())
    # Some prompt ends in a partial block for each block size.
    lengths = [len(p) for p in v["prompts"].values()]
    for bs in v["block_sizes"]:
        assert any(n % bs and n > bs for n in lengths)


@pytest.mark.parametrize(
    ("seed", "algo", "entry"),
    [pytest.param(s, a, e, id=f"seed={s}-{a}") for s, a, e in _seed_entries()],
)
def test_none_hash_matches_vllm(seed: str | None, algo: str, entry: dict[str, Any]) -> None:
    expected = bytes.fromhex(entry["none_hash"])
    assert none_hash(algo, seed) == expected  # type: ignore[arg-type]
    assert BlockHasher(algo, seed).none_hash == expected  # type: ignore[arg-type]
    assert to_wire(expected) == entry["none_hash_wire"]


@pytest.mark.parametrize(("seed", "algo", "block_size", "variant", "cases"), _case_groups())
def test_block_hashes_match_vllm(
    seed: str | None, algo: str, block_size: int, variant: str, cases: list[dict[str, Any]]
) -> None:
    v = vectors()
    opts = v["variants"][variant]
    hasher = BlockHasher(algo, seed)  # type: ignore[arg-type]
    for case in cases:
        tokens = v["prompts"][case["prompt"]]
        assert len(tokens) == case["num_tokens"]
        where = f"{case['prompt']} (seed={seed}, {algo}, bs={block_size}, {variant})"

        got = hasher.hash_prompt(tokens, block_size, **opts)
        # Only full blocks are hashed: a partial last block has no hash.
        assert len(got) == len(tokens) // block_size == len(case["block_hashes"]), where
        assert [h.hex() for h in got] == case["block_hashes"], where
        assert [to_wire(h) for h in got] == case["wire"], where
        assert all(to_wire_bytes(h) == h and len(h) == 32 for h in got), where

        tagged = [block_extra_keys(i * block_size, **opts) for i in range(len(got))]
        assert _jsonable(tagged) == case["extra_keys"], where
        untagged = [event_extra_keys(k) for k in tagged]
        expected_untagged = case["event_extra_keys"] or [None] * len(got)
        assert _jsonable(untagged) == expected_untagged, where

        # Chaining block by block with hash_block gives the same hashes.
        parent: bytes | None = None
        for i, expected in enumerate(case["block_hashes"]):
            block = tokens[i * block_size : (i + 1) * block_size]
            parent = hasher.hash_block(parent, block, tagged[i])
            assert parent.hex() == expected, f"{where} block {i}"


def test_wire_ints_are_unsigned_64_bit() -> None:
    wires = [w for _, _, e in _seed_entries() for c in e["cases"] for w in c["wire"]]
    assert wires
    assert all(isinstance(w, int) and 0 <= w < U64 for w in wires)
    # Both halves of the range occur, so a signed decode would be wrong.
    assert any(w >= 2**63 for w in wires)
    assert any(w < 2**63 for w in wires)


def test_to_wire_takes_last_8_bytes_big_endian() -> None:
    h = bytes(range(32))
    assert to_wire(h) == int.from_bytes(h[-8:], "big") == 0x18191A1B1C1D1E1F
    assert to_wire(b"\xff" * 32) == U64 - 1
    assert to_wire(b"\x01" + b"\x00" * 31) == 0
    assert to_wire_bytes(h) == h


def test_unset_seed_is_deterministic_like_vllm_0_32() -> None:
    # vLLM 0.32 derives NONE_HASH from a fixed default seed for the SHA-256
    # algorithms when PYTHONHASHSEED is unset; the generator checked it in two processes.
    v = vectors()
    assert v["default_none_hash_seed"] == DEFAULT_NONE_HASH_SEED
    assert all(v["unset_seed_none_hash_reproducible"].values())
    for algo in ("sha256", "sha256_cbor"):
        assert none_hash(algo, None) == none_hash(algo, None)
        assert none_hash(algo, None) == none_hash(algo, DEFAULT_NONE_HASH_SEED)
        assert none_hash(algo, None) != none_hash(algo, "0")


def test_seed_is_hashed_as_a_string() -> None:
    assert none_hash("sha256", "0") != none_hash("sha256", "00")
    assert none_hash("sha256", "0") == hash_object("sha256", "0")


def test_default_seed_comes_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    by_seed = {(s, a): bytes.fromhex(e["none_hash"]) for s, a, e in _seed_entries()}
    monkeypatch.setenv("PYTHONHASHSEED", "12345")
    assert BlockHasher("sha256_cbor").none_hash == by_seed[("12345", "sha256_cbor")]
    assert BlockHasher().hash_seed == "12345"
    monkeypatch.delenv("PYTHONHASHSEED")
    assert BlockHasher().none_hash == by_seed[(None, "sha256")]
    assert BlockHasher().hash_seed is None
    # An explicit seed wins over the environment.
    monkeypatch.setenv("PYTHONHASHSEED", "12345")
    assert BlockHasher("sha256", "0").none_hash == by_seed[("0", "sha256")]
    assert BlockHasher("sha256", None).none_hash == by_seed[(None, "sha256")]


def test_first_block_parent_forms_are_equivalent() -> None:
    hasher = BlockHasher("sha256", "0")
    tokens = list(range(16))
    first = hasher.hash_block(None, tokens, None)
    assert hasher.hash_block(b"", tokens, None) == first
    assert hasher.hash_block(hasher.none_hash, tokens, None) == first
    assert hasher.hash_block(None, tuple(tokens), None) == first
    assert hasher.hash_block(None, range(16), None) == first
    assert hasher.hash_prompt(tokens, 16) == [first]


def test_cache_salt_only_on_first_block_and_lora_on_all() -> None:
    assert block_extra_keys(0, cache_salt="s1") == (("cache_salt", "s1"),)
    assert block_extra_keys(16, cache_salt="s1") is None
    assert block_extra_keys(0, cache_salt="") is None
    assert block_extra_keys(32, lora_name="a", lora_path="/p") == (("lora", "a", "/p"),)
    both = block_extra_keys(0, lora_name="a", lora_path="/p", cache_salt="s1")
    assert both == (("lora", "a", "/p"), ("cache_salt", "s1"))
    assert event_extra_keys(both) == ("a", "s1")
    assert event_extra_keys(None) is None
    assert event_extra_keys((("mm", "img", 3),)) == (("img", 3),)


def test_same_string_object_for_two_fields_pickles_like_vllm() -> None:
    # vLLM's LoRA name and salt are distinct str objects; one shared object must not
    # change the pickle (pickle memoises by identity).
    shared = "lora"
    hasher = BlockHasher("sha256", "0")
    tokens = list(range(32))
    same = hasher.hash_prompt(tokens, 16, lora_name=shared, lora_path="/x", cache_salt=shared)
    distinct = hasher.hash_prompt(
        tokens, 16, lora_name="".join(["lo", "ra"]), lora_path="/x", cache_salt="".join("lora")
    )
    assert same == distinct


@pytest.mark.parametrize(
    "kwargs",
    [{"lora_name": "a"}, {"lora_name": "a", "lora_path": ""}, {"lora_path": "/p"}],
)
def test_lora_needs_name_and_path(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        BlockHasher("sha256", "0").hash_prompt(list(range(32)), 16, **kwargs)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        BlockHasher("xxhash", "0")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        none_hash("md5", "0")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        BlockHasher("sha256", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BlockHasher("sha256", "0").hash_prompt([1, 2, 3], 0)


def test_short_prompts_have_no_blocks() -> None:
    hasher = BlockHasher("sha256_cbor", "0")
    assert hasher.hash_prompt([], 16) == []
    assert hasher.hash_prompt(list(range(15)), 16) == []
    assert len(hasher.hash_prompt(list(range(47)), 16)) == 2
