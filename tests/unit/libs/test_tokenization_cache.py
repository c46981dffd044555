"""The prompt and chunk caches: bounded, LRU, and the ids they give equal a full tokenization."""

from __future__ import annotations

import itertools
import json
import random
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
from infermesh.libs.tokenization.cache import (
    DEFAULT_CHARS_PER_TOKEN,
    PARALLEL_MIN_CHARS,
    RECALL_MIN_CHARS,
    ByteLRU,
    CachingTokenizer,
    EncodePlan,
)
from infermesh.libs.tokenization.chunking import boundaries

from .test_tokenization_chunking import FIXTURE_OK, texts


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
    # A text this long skips the prompt cache: the last long text that began with the same
    # chunk (and the same special tokens) is recalled, found whole here.
    assert (ct.prompt_cache.hits, ct.recall_hits, ct.recall_misses) == (0, 1, 2)
    assert ct.recalled_chars == len(text)
    # The same document with another question: only the tail goes through the tokenizer.
    other = text[: len(text) * 3 // 4] + "\n\nQuestion: what did Alice say about the cache?"
    assert ct.encode(other, True).tolist() == tok.encode(other, True)
    assert ct.encoded_chars - encoded < len(text) // 4 + 2 * ct.chunker.min_chars
    assert ct.chunk_cache.hits > 0


def test_long_texts_recalled_from_the_last_like_them_equal_the_full_encode(
        tok: ModelTokenizer) -> None:
    """A long text starts from the chunks of the last long text that began with the same
    chunk: cut anywhere (at a cut, one character before or after it, inside a chunk) and
    continued otherwise — a space after a newline moves the cut — its ids and keys are still
    exactly the full encode's, its chunks the ones a fresh cut gives, and the shared part is
    recalled rather than cut and hashed again."""
    rng = random.Random(3)
    doc = long_text(5, 120)
    assert len(doc) > RECALL_MIN_CHARS + 4096
    ct = caching(tok, chunk_chars=256)
    # Where the document's chunks end (the cuts a recalled text may share or not), and other
    # safe boundaries.
    ends = list(itertools.accumulate(map(len, ct.chunker.split(doc))))[:-1]
    cuts = [c for c in ends if c > RECALL_MIN_CHARS]
    others = [c for c in boundaries(doc) if c > RECALL_MIN_CHARS and c not in ends]
    points = [c + d for c in rng.sample(cuts, 8) for d in (-1, 0, 1)]
    points += rng.sample(others, 4) + [rng.randrange(RECALL_MIN_CHARS, len(doc))
                                       for _ in range(4)]
    tails = [" and then?", "\n next", "\n\n  indented", "x", " ", "\nQ: " + doc[:300]]
    assert ct.encode(doc, True).tolist() == tok.encode(doc, True)
    before = ct.recalled_chars
    for i, at in enumerate(points):
        ct.encode(doc, True)  # the document is the last long text like it
        text = doc[:at] + tails[i % len(tails)]
        plan = ct.plan(text, True)
        assert plan.chunks == ct.chunker.split(text), at
        ct.run(plan)
        assert ct.finish(plan).ids.tolist() == tok.encode(text, True), at
        keys = ct.block_keys(plan, "m", 16)
        assert keys.tolist() == prompt_keys("m", tok.encode(text, True), 16), at
    assert ct.recalled_chars - before > len(points) * RECALL_MIN_CHARS
    # The same text again is recalled whole, with the entry (and its keys) of the last time.
    entry, hits = plan.entry, ct.recall_hits
    again = ct.plan(text, True)
    assert again.entry is entry and ct.recall_hits == hits + 1 and not again.missing
    # Without special tokens it is another text: the one recalled must match that too.
    assert ct.encode(text, False).tolist() == tok.encode(text, False)


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


# ------------------------------------------------------------------ the known prefix of a plan


def check_known_prefix(ct: CachingTokenizer, tok: ModelTokenizer, text: str, special: bool,
                       bs: int, lora: str | None = None, salt: str | None = None,
                       first: bool | str = True) -> int:
    """known_prefix() of a plan of ``text`` (its first missing chunk tokenized, its head
    (``first="head"``: run_head()), or neither) against a full tokenization; its key count."""
    plan = ct.plan(text, special)
    if first == "head":
        ct.run_head(plan)
        assert len(plan.pending) == len(plan.missing)  # no chunk was run
    elif first:
        ct.run(plan, first=True)
        assert len(plan.pending) == max(0, len(plan.missing) - 1)
    n, keys = ct.known_prefix(plan, "m", bs, lora_name=lora, cache_salt=salt)
    ids = tok.encode(text, special)
    full = prompt_keys("m", ids, bs, lora_name=lora, cache_salt=salt)
    head = ct.affixes[0] if special and ct.affixes else []
    known = array("I", head)
    for part in plan.parts[: plan.known]:
        assert part is not None
        known.extend(part)
    assert plan.known == len(plan.chunks) or plan.parts[plan.known] is None
    if first == "head":
        assert plan.known == (plan.missing[0] if plan.missing else len(plan.chunks))
        known.extend(plan.head_ids or [])
        # The characters counted are exactly those of the ids counted.
        assert tok.encode(text[: plan.known_chars], False) == known.tolist()[len(head):]
    else:
        assert plan.missing[:1] == [] or (plan.known > plan.missing[0]) == first
    assert known.tolist() == ids[: len(known)] and n == len(known)  # the first ids, exactly
    assert len(keys) == n // bs  # every block inside the known prefix, and only those
    assert keys.tolist() == full[: len(keys)]
    return len(keys)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


@settings(max_examples=400, deadline=None, suppress_health_check=FIXTURE_OK)
@given(seen=st.lists(texts, max_size=2), parts=st.lists(texts, min_size=1, max_size=5),
       special=st.booleans(), chunk_chars=st.integers(1, 12), bs=st.integers(1, 4),
       lora=st.sampled_from([None, "a"]), salt=st.sampled_from([None, "s"]),
       key_bytes=st.sampled_from([0, 600, 1 << 20]), keyed=st.booleans(),
       evicting=st.booleans(), first=st.sampled_from([False, True, "head"]), data=st.data())
def test_known_prefix_equals_full_tokenization(
    tok: ModelTokenizer, seen: list[str], parts: list[str], special: bool, chunk_chars: int,
    bs: int, lora: str | None, salt: str | None, key_bytes: int, keyed: bool, evicting: bool,
    first: bool | str, data: st.DataObject,
) -> None:
    """Whatever the caches saw before (prefixes of the text, other texts, keyed or not, through
    small evicting caches or not), the known prefix's count and keys are a full tokenization's;
    and with the first missing chunk tokenized, or only its head, they cover every block of a
    seen text's ids."""
    size = 3000 if evicting else 1 << 24
    ct = caching(tok, chunk_chars=chunk_chars, prompt_bytes=size, chunk_bytes=size,
                 key_bytes=key_bytes)
    text = "".join(parts)
    cuts = data.draw(st.lists(st.integers(0, len(text)), min_size=1, max_size=3))
    ends = data.draw(st.lists(st.sampled_from(["", "x", " ", "\n", " y", "\nz"]),
                              min_size=len(cuts), max_size=len(cuts)))
    earlier = [*seen, *(text[:c] + e for c, e in zip(cuts, ends, strict=True))]
    for t in earlier:
        plan = ct.plan(t, special)
        ct.run(plan)
        ct.finish(plan)
        if keyed:
            ct.block_keys(plan, "m", bs, lora_name=lora, cache_salt=salt)
    ct.prompt_cache.clear()  # a whole-text hit would have no chunks to look at
    count = check_known_prefix(ct, tok, text, special, bs, lora, salt, first)
    if first and not evicting:  # no block an engine may hold (from a seen text) is left out
        ids = tok.encode(text, special)
        assert count >= max(common_prefix(ids, tok.encode(t, special)) for t in earlier) // bs


def test_known_prefix_over_random_texts_and_cuts(tok: ModelTokenizer) -> None:
    """Corpus texts (prose, code, JSON, many scripts) seen up to a random cut, or with another
    ending, then asked with a new tail: every known prefix is a full tokenization's."""
    rng = random.Random(5)
    docs = list(itertools.islice(corpus(10), 400))
    with_keys = 0
    for _ in range(150):
        text = "\n\n".join(rng.sample(docs, rng.randint(1, 6)))
        ct = caching(tok, chunk_chars=rng.choice([8, 64, 200, 1000]),
                     key_bytes=rng.choice([0, 1 << 20]))
        special, bs = rng.random() < 0.5, rng.choice([1, 4, 16, 64])
        lora, salt = rng.choice([None, "l"]), rng.choice([None, "s"])
        for _seen in range(rng.randint(0, 2)):
            cut = rng.randint(0, len(text))
            earlier = text[:cut] + rng.choice(["", " and more", "\n" + rng.choice(docs)])
            if rng.random() < 0.7:  # keyed (the key chain holds its chunks) or not
                keys_of(ct, earlier, special, bs, lora, salt)
            else:
                ct.encode(earlier, special)
        first = rng.choice([False, True, True, "head", "head"])
        with_keys += check_known_prefix(ct, tok, text, special, bs, lora, salt, first) > 0
    assert with_keys > 50


def test_known_prefix_of_long_texts(tok: ModelTokenizer) -> None:
    ct = caching(tok, chunk_chars=256)
    doc = long_text(7, 120)
    new = "\n\n".join(itertools.islice(corpus(8), 30))
    # Nothing seen: no chunk is known, so no block (BOS alone fills no block of 16) ...
    assert check_known_prefix(ct, tok, doc, True, 16, first=False) == 0
    assert check_known_prefix(ct, tok, doc, False, 16, first=False) == 0
    assert check_known_prefix(ct, tok, doc, True, 1, first=False) == 1  # but one of BOS alone
    plan = ct.plan(doc, True)
    assert plan.known == 0 and ct.known_prefix(plan, "m", 16) == (1, array("Q"))
    # ... or only the first chunk's, once it is tokenized.
    first = len(tok.encode(ct.chunker.split(doc)[0], add_special_tokens=False))
    assert check_known_prefix(ct, tok, doc, True, 16) == (first + 1) // 16
    # The document seen (and keyed), then a new question after it: its keys cover the
    # document but for the chunk that ran into the question, from the chain or hashed.
    keys_of(ct, doc, True, 16, "lora")
    for lora in ("lora", None):
        hits = ct.key_cache.hits
        count = check_known_prefix(ct, tok, doc + "\n\nQuestion:\n" + new, True, 16, lora)
        assert count >= (len(tok.encode(doc)) - 2 * 256) // 16
        # Only the head of the chunk that ran into the question: the document but for a piece.
        head = check_known_prefix(ct, tok, doc + "\n\nQuestion:\n" + new, True, 16, lora,
                                  first="head")
        assert (len(tok.encode(doc)) - 2 * 32 * 4) // 16 <= head <= count
        assert (ct.key_cache.hits > hits) == (lora == "lora")
    # A new document first: whatever follows it, nothing but its first chunk is known.
    other = long_text(11, 40)
    assert check_known_prefix(ct, tok, other + doc, True, 16, first=False) == 0
    first = len(tok.encode(ct.chunker.split(other)[0], add_special_tokens=False))
    assert check_known_prefix(ct, tok, other + doc, True, 16) == (first + 1) // 16
    # A text without chunking (whole) has no known prefix.
    plan = EncodePlan("x", True, whole=True, chunks=["x"], parts=[None], missing=[0])
    assert ct.known_prefix(plan, "m", 1) == (0, array("Q"))


def test_chars_per_token_is_measured(tok: ModelTokenizer) -> None:
    ct = caching(tok)
    assert ct.chars_per_token == DEFAULT_CHARS_PER_TOKEN
    text = long_text(9, 100)
    ids = ct.encode(text, False)
    assert ct.encoded_tokens == len(ids) and ct.chars_per_token == len(text) / len(ids)
    ct.encode(text, False)  # from the prompt cache: nothing new measured
    assert ct.encoded_tokens == len(ids)


def test_plans_share_the_cached_text_of_their_chunks(tok: ModelTokenizer) -> None:
    """A chunk found in the cache is the cached string itself (later lookups compare by
    identity), and what a plan gives equals a full tokenization as before."""
    ct = caching(tok, chunk_chars=256)
    doc = long_text(12, 40)
    keys_of(ct, doc, True, 16)
    ct.prompt_cache.clear()
    a, b = ct.plan(doc, True), ct.plan(doc + "\n\nMore?", True)
    assert len(a.chunks) > 3 and not a.missing
    assert all(x is y for x, y in zip(a.chunks[:-1], b.chunks, strict=False))
    assert "".join(b.chunks) == doc + "\n\nMore?"
    assert keys_of(ct, doc + "\n\nMore?", True, 16) == prompt_keys(
        "m", tok.encode(doc + "\n\nMore?"), 16)
