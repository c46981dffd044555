"""The prompt and chunk caches: bounded, LRU, and the ids they give equal a full tokenization."""

from __future__ import annotations

import itertools
import json
from array import array
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from infermesh.libs.kvblock import prompt_keys
from infermesh.libs.tinymodel.corpus import corpus
from infermesh.libs.tokenization import ModelTokenizer, TokenizationError
from infermesh.services.tokenizer.cache import PARALLEL_MIN_CHARS, ByteLRU, CachingTokenizer

from .test_chunking import FIXTURE_OK, texts


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.from_folder(model_dir)


def caching(tok: ModelTokenizer, *, chunk_chars: int = 2048, prompt_bytes: int = 1 << 26,
            chunk_bytes: int = 1 << 26, key_bytes: int = 1 << 24,
            name: str = "m") -> CachingTokenizer:
    return CachingTokenizer(name, tok, prompt_cache=ByteLRU(prompt_bytes, 1024),
                            chunk_cache=ByteLRU(chunk_bytes), key_cache=ByteLRU(key_bytes),
                            chunk_chars=chunk_chars)


def long_text(seed: int, docs: int = 400) -> str:
    return "\n\n".join(itertools.islice(corpus(seed), docs))


# ---------------------------------------------------------------------------------- ByteLRU


def test_lru_evicts_least_recently_used_and_stays_in_bounds() -> None:
    lru: ByteLRU[str, int] = ByteLRU(100, max_entries=3)
    lru.put("a", 1, 40)
    lru.put("b", 2, 40)
    assert lru.get("a") == 1  # b is now the oldest
    lru.put("c", 3, 40)  # 120 bytes: b goes
    assert "b" not in lru and lru.bytes == 80 and len(lru) == 2
    lru.put("d", 4, 1)
    lru.put("e", 5, 1)  # 4 entries: the oldest (a) goes
    assert list(lru._data) == ["c", "d", "e"] and lru.evictions == 2
    lru.put("huge", 0, 101)  # larger than the budget: not stored, nothing evicted
    assert "huge" not in lru and len(lru) == 3
    lru.put("c", 30, 10)  # replace: size re-counted
    assert lru.bytes == 12 and lru.get("c") == 30
    assert lru.get("zzz") is None and lru.hits == 2 and lru.misses == 1
    lru.resize("c", 999, 50)  # not the stored value: ignored
    assert lru.bytes == 12
    value = lru.get("d")
    lru.resize("d", value, 60)
    assert lru.bytes == 71
    lru.clear()
    assert len(lru) == 0 and lru.bytes == 0


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 60)), max_size=100),
       max_bytes=st.integers(1, 200), max_entries=st.integers(0, 8))
def test_lru_bounds_hold_under_any_sequence(ops: list[tuple[int, int]], max_bytes: int,
                                            max_entries: int) -> None:
    lru: ByteLRU[int, int] = ByteLRU(max_bytes, max_entries)
    model: dict[int, int] = {}
    for key, size in ops:
        lru.put(key, size, size)
        model[key] = size
        assert lru.bytes <= max_bytes
        assert not max_entries or len(lru) <= max_entries
        assert lru.bytes == sum(s for _, s in lru._data.values())
        for k in list(lru._data):
            assert lru._data[k][0] == model[k]  # never a stale value


# ------------------------------------------------------------------------- CachingTokenizer


def test_long_text_cold_cached_and_prefix_shared_equal_the_full_encode(tok: ModelTokenizer) -> None:
    ct = caching(tok)
    assert ct.chunking and ct.affixes == ([tok.bos_token_id], [])
    text = long_text(1)
    assert len(text) > 4 * PARALLEL_MIN_CHARS
    for special in (True, False):
        assert ct.encode(text, special).tolist() == tok.encode(text, special)
    encoded = ct.encoded_chars
    assert encoded == len(text)  # the second call reused every chunk
    assert ct.encode(text, True).tolist() == tok.encode(text, True)
    assert ct.prompt_cache.hits == 1
    # The same document with another question: only the tail goes through the tokenizer.
    other = text[: len(text) * 3 // 4] + "\n\nQuestion: what did Alice say about the cache?"
    assert ct.encode(other, True).tolist() == tok.encode(other, True)
    assert ct.encoded_chars - encoded < len(text) // 4 + 2 * ct.chunker.min_chars
    assert ct.chunk_cache.hits > 0


def test_text_without_newlines_is_chunked_too(tok: ModelTokenizer) -> None:
    words = "alpha beta gamma delta river stone cloud light".split()
    text = " ".join(words[i * 7 % 8] for i in range(5000))
    ct = caching(tok, chunk_chars=512)
    assert len(ct.plan(text, True).chunks) > 10
    assert ct.encode(text, True).tolist() == tok.encode(text, True)
    assert ct.encode(text + " more", True).tolist() == tok.encode(text + " more", True)


def test_empty_and_short_texts(tok: ModelTokenizer) -> None:
    ct = caching(tok)
    for text in ("", " ", "a", "<|eot_id|>"):
        for special in (True, False):
            assert ct.encode(text, special).tolist() == tok.encode(text, special)


@settings(max_examples=400, deadline=None, suppress_health_check=FIXTURE_OK)
@given(parts=st.lists(texts, min_size=1, max_size=4), special=st.booleans(),
       chunk_chars=st.integers(1, 16))
def test_prefix_sharing_texts_equal_the_full_encode(tok: ModelTokenizer, parts: list[str],
                                                    special: bool, chunk_chars: int) -> None:
    """Texts that grow from one another (as a conversation does) through small, evicting caches."""
    ct = caching(tok, chunk_chars=chunk_chars, prompt_bytes=4000, chunk_bytes=6000)
    text = ""
    for part in parts:
        text += part
        for _ in range(2):
            assert ct.encode(text, special).tolist() == tok.encode(text, special)


# One shared instance across examples: caches warm with unrelated texts must not mix them up.
_shared: dict[str, CachingTokenizer] = {}


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURE_OK)
@given(text=texts, special=st.booleans())
def test_a_long_lived_cache_never_mixes_texts(tok: ModelTokenizer, text: str,
                                              special: bool) -> None:
    ct = _shared.setdefault("ct", caching(tok, chunk_chars=3, prompt_bytes=20000,
                                          chunk_bytes=20000))
    assert ct.encode(text, special).tolist() == tok.encode(text, special)


def _variant(tok: ModelTokenizer, edit: dict[str, Any]) -> ModelTokenizer:
    data = json.loads(tok.backend.to_str())
    data.update(edit)
    return ModelTokenizer(Tokenizer.from_str(json.dumps(data)),
                          tokenizer_config={"bos_token": "<|begin_of_text|>"})


def test_a_tokenizer_without_safe_boundaries_is_cached_whole(tok: ModelTokenizer) -> None:
    nfc = _variant(tok, {"normalizer": {"type": "NFC"}})
    ct = caching(nfc, chunk_chars=8)
    assert not ct.chunking and "normalizer" in (ct.chunking_off_reason or "")
    text = long_text(2, 20) + "e\u0301\n"
    for special in (True, False):
        plan = ct.plan(text, special)
        assert plan.whole and plan.chunks == [text]
        assert ct.encode(text, special).tolist() == nfc.encode(text, special)
    assert len(ct.chunk_cache) == 0 and ct.prompt_cache.hits == 0
    assert ct.encode(text, True).tolist() == nfc.encode(text, True)
    assert ct.prompt_cache.hits == 1


def test_post_processor_affixes_are_found(tok: ModelTokenizer) -> None:
    eot = tok.token_to_id("<|eot_id|>")
    bos = tok.bos_token_id
    both = _variant(tok, {"post_processor": {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "<|eot_id|>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos],
                                  "tokens": ["<|begin_of_text|>"]},
            "<|eot_id|>": {"id": "<|eot_id|>", "ids": [eot], "tokens": ["<|eot_id|>"]},
        },
    }})
    ct = caching(both, chunk_chars=64)
    assert ct.affixes == ([bos], [eot])
    text = long_text(3, 30)
    assert ct.encode(text, True).tolist() == both.encode(text, True)
    none = _variant(tok, {"post_processor": None})
    ct = caching(none, chunk_chars=64)
    assert ct.affixes == ([], [])
    assert ct.encode(text, True).tolist() == none.encode(text, True)


def test_block_keys_are_kvblock_keys_and_remembered(tok: ModelTokenizer) -> None:
    ct = caching(tok)
    text = long_text(4, 50)
    plan = ct.plan(text, True)
    ct.run(plan)
    entry = ct.finish(plan)
    ids = tok.encode(text)
    size = ct.prompt_cache.bytes
    for bs, lora, salt in [(16, None, None), (16, "adapter", None), (32, None, "salt"),
                           (16, "adapter", "salt"), (64, None, None)]:
        keys = ct.block_keys(plan, "m", bs, lora_name=lora, cache_salt=salt)
        assert keys.tolist() == prompt_keys("m", ids, bs, lora_name=lora, cache_salt=salt)
        assert ct.block_keys(plan, "m", bs, lora_name=lora, cache_salt=salt) is keys
    assert len(entry.keys) == 4  # bounded per entry
    assert ct.prompt_cache.bytes > size  # the keys are counted in the cache's bytes
    assert isinstance(entry.ids, array)


def keys_of(ct: CachingTokenizer, text: str, special: bool, bs: int, lora: str | None = None,
            salt: str | None = None) -> list[int]:
    plan = ct.plan(text, special)
    ct.run(plan)
    ct.finish(plan)
    return ct.block_keys(plan, "m", bs, lora_name=lora, cache_salt=salt).tolist()


def test_prompts_sharing_chunks_reuse_their_keys(tok: ModelTokenizer) -> None:
    ct = caching(tok, chunk_chars=256)
    doc = long_text(6, 80)
    for i, question in enumerate(("What is it?", "And then?", "Why so?\n")):
        text = doc + "\n\nQuestion: " + question
        ids = tok.encode(text)
        assert keys_of(ct, text, True, 16, "lora", "salt") == prompt_keys(
            "m", ids, 16, lora_name="lora", cache_salt="salt")
        if i:
            assert ct.key_cache.hits >= len(doc) // 256 - 2
    hits = ct.key_cache.hits
    # Another variant (block size, LoRA, salt or special tokens) shares nothing.
    text = doc + "\n\nQuestion: What is it?"
    for special, bs, lora, salt in [(True, 8, "lora", "salt"), (True, 16, None, "salt"),
                                    (True, 16, "lora", None), (False, 16, "lora", "salt")]:
        ct.prompt_cache.clear()
        assert keys_of(ct, text, special, bs, lora, salt) == prompt_keys(
            "m", tok.encode(text, special), bs, lora_name=lora, cache_salt=salt)
        assert ct.key_cache.hits == hits


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURE_OK)
@given(parts=st.lists(texts, min_size=1, max_size=4), special=st.booleans(),
       chunk_chars=st.integers(1, 12), bs=st.integers(1, 6),
       lora=st.sampled_from([None, "a"]), salt=st.sampled_from([None, "s"]),
       key_bytes=st.sampled_from([600, 5000, 1 << 20]))
def test_chained_keys_equal_prompt_keys(tok: ModelTokenizer, parts: list[str], special: bool,
                                        chunk_chars: int, bs: int, lora: str | None,
                                        salt: str | None, key_bytes: int) -> None:
    """Growing texts through small, evicting caches: keys always equal a fresh prompt_keys."""
    ct = caching(tok, chunk_chars=chunk_chars, prompt_bytes=3000, chunk_bytes=3000,
                 key_bytes=key_bytes)
    text = ""
    for part in parts:
        text += part
        expected = prompt_keys("m", tok.encode(text, special), bs, lora_name=lora,
                               cache_salt=salt)
        for _ in range(2):
            assert keys_of(ct, text, special, bs, lora, salt) == expected


def test_run_maps_untokenizable_text_to_tokenization_error(tok: ModelTokenizer) -> None:
    ct = caching(tok, chunk_chars=4)
    for text in ("abc def \ud800 ghi jkl", long_text(5, 200) + "\ud800"):  # one by one, batched
        plan = ct.plan(text, True)
        with pytest.raises(TokenizationError):
            ct.run(plan)
