"""Block keys: chained, seeded by model, extra keys as vLLM publishes them, one implementation."""

import pytest

from infermesh.libs import kvblock as kb


def test_chain_matches_block_by_block() -> None:
    toks = list(range(100))
    keys = kb.prompt_keys("m", toks, 16)
    assert len(keys) == 6  # the trailing 4 tokens are not a full block
    parent = kb.model_seed("m")
    for i, k in enumerate(keys):
        parent = kb.key(parent, toks[i * 16 : (i + 1) * 16])
        assert parent == k
        assert 0 <= k < 2**64


def test_prefix_property_and_divergence() -> None:
    a = kb.prompt_keys("m", list(range(64)), 16)
    b = kb.prompt_keys("m", list(range(48)) + [999] * 16, 16)
    assert a[:3] == b[:3] and a[3] != b[3]
    # A change in an early block changes every later key (chaining).
    c = kb.prompt_keys("m", [7] + list(range(1, 64)), 16)
    assert all(x != y for x, y in zip(a, c, strict=True))


def test_model_lora_and_salt_separate_keys() -> None:
    toks = list(range(32))
    base = kb.prompt_keys("m", toks, 16)
    assert kb.prompt_keys("other", toks, 16) != base
    lora = kb.prompt_keys("m", toks, 16, lora_name="ad1")
    assert lora[0] != base[0] and lora[1] != base[1]
    salted = kb.prompt_keys("m", toks, 16, cache_salt="s")
    assert salted[0] != base[0] and salted[1] != base[1]  # the chain carries it on
    # Matches the per-block form with the extra keys vLLM publishes for each block.
    p = kb.model_seed("m")
    k0 = kb.key(p, toks[:16], kb.block_extra(0, lora_name="ad1", cache_salt="s"))
    k1 = kb.key(k0, toks[16:], kb.block_extra(1, lora_name="ad1", cache_salt="s"))
    assert kb.prompt_keys("m", toks, 16, lora_name="ad1", cache_salt="s") == [k0, k1]
    assert kb.block_extra(1, lora_name="ad1", cache_salt="s") == ("ad1",)
    assert kb.block_extra(3) is None


def test_bad_block_size() -> None:
    with pytest.raises(ValueError):
        kb.prompt_keys("m", [1, 2], 0)
    assert kb.prompt_keys("m", [1, 2], 16) == []
