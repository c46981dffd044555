"""The chunk boundaries are safe: cutting a text at any of them and tokenizing the pieces gives
exactly the ids of the whole text (property tests over texts built to stress the tokenizer's
split pattern: whitespace runs, newlines, contractions, digits, punctuation, special tokens,
unicode)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from infermesh.libs.tokenization import ModelTokenizer
from infermesh.libs.tokenization.chunking import (
    TextChunker,
    boundaries,
    chunking_unsafe_reason,
)

FIXTURE_OK = [HealthCheck.function_scoped_fixture]

# Pieces that sit on or next to the split pattern's decisions.
FRAGMENTS = [
    "a", "Z", "word", "Hello", " ", "  ", "   ", "\n", "\n\n", "\r\n", "\r", "\t", "\x0b", "\x0c",
    "\x85", "\xa0", "\u2028", "\u2029", "\u3000", "\u180e", "\u200b", "\ufeff", "\x1c", "\x1f",
    "'", "'s", "'S", "'ll", "'re", "'ve", "'m", "'d", "'t", "s", "ll", "1", "12", "123", "1234",
    "3.14", ".", ",", "...", "!?", "-", "_", '"', "(", ")", "{", "}", ":", "#", "`", "*",
    "é", "e\u0301", "\u0301", "ß", "ſ", "K", "日本語", "東京", "🙂", "👍🏽", "Привет", "שלום",
    "<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|", "|>", "<|eot_id",
    "def f(x):\n    return x + 1\n", "    ", "\n    ", "{\"a\": 1}", "// c\n", "\x00",
]

# Long texts of varied pieces, and short dense ones over the chars the pattern decides on.
texts = st.one_of(
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=60).map(
        "".join
    ),
    st.lists(
        st.sampled_from(
            [*"ab .,'s1\n\r\t\x0b", "\x85", "\xa0", "\u3000", "\u180e", "é", "日", "<|eot_id|>"]
        ),
        max_size=40,
    ).map("".join),
)


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.from_folder(model_dir)


def test_the_tiny_model_allows_chunking(model_dir: Path) -> None:
    data = json.loads((model_dir / "tokenizer.json").read_text())
    assert chunking_unsafe_reason(data) is None


@settings(max_examples=1500, deadline=None, suppress_health_check=FIXTURE_OK)
@given(text=texts)
@example(text="a  \nb")
@example(text="x.\ny")
@example(text="a \n\nb c")
@example(text="it's fine\n'll go")
@example(text="a\n\u180eb")
@example(text="a\n\x85b")
@example(text="x<|eot_id|>\ny")
def test_every_boundary_is_safe(tok: ModelTokenizer, text: str) -> None:
    whole = tok.encode(text, add_special_tokens=False)
    for p in boundaries(text):
        left = tok.encode(text[:p], add_special_tokens=False)
        right = tok.encode(text[p:], add_special_tokens=False)
        assert left + right == whole, (text, p)


def _pieces(tok: ModelTokenizer, text: str) -> list[str]:
    return [piece for piece, _ in tok.backend.pre_tokenizer.pre_tokenize_str(text)]


@settings(max_examples=1500, deadline=None, suppress_health_check=FIXTURE_OK)
@given(text=texts)
@example(text="x\n\t\ny")
@example(text="a\n \nb")
def test_every_boundary_keeps_the_pre_tokenizer_pieces(tok: ModelTokenizer, text: str) -> None:
    """Stronger than equal ids (the tiny vocabulary may merge differing pieces alike): the split
    pattern cuts the pieces exactly as it cuts the whole, whatever the vocabulary."""
    whole = _pieces(tok, text)
    for p in boundaries(text):
        assert _pieces(tok, text[:p]) + _pieces(tok, text[p:]) == whole, (text, p)


@settings(max_examples=800, deadline=None, suppress_health_check=FIXTURE_OK)
@given(text=texts, min_chars=st.integers(1, 12))
def test_chunks_concatenate_to_the_whole(tok: ModelTokenizer, text: str, min_chars: int) -> None:
    chunks = TextChunker(min_chars).split(text)
    assert "".join(chunks) == text
    assert all(chunks) or chunks == [""]
    ids = [i for c in chunks for i in tok.encode(c, add_special_tokens=False)]
    assert ids == tok.encode(text, add_special_tokens=False)


@settings(max_examples=100, deadline=None)
@given(prefix=texts, a=texts, b=texts, min_chars=st.integers(1, 8))
def test_shared_prefixes_share_chunks(prefix: str, a: str, b: str, min_chars: int) -> None:
    chunker = TextChunker(min_chars)
    ca, cb = chunker.split(prefix + a), chunker.split(prefix + b)
    # Every chunk that ends (with its look-ahead char) inside the shared prefix is the same.
    pos = 0
    for x, y in zip(ca, cb, strict=False):
        if pos + len(x) >= len(prefix):
            break
        assert x == y
        pos += len(x)


def test_boundary_rules_by_example() -> None:
    assert boundaries("ab\ncd") == [3]  # after a newline before a non-space
    assert boundaries("ab\n cd") == []  # not before a space (it joins the newline)
    assert boundaries("ab cd") == [2]  # after an ASCII letter before a space
    assert boundaries("é cd") == []  # non-ASCII letters are left alone
    assert boundaries("ab\n\ncd") == [4]
    assert boundaries("a\n\u180eb") == []
    assert TextChunker(3).split("abc def ghi") == ["abc", " def", " ghi"]
    assert TextChunker(4).split("abc def ghi") == ["abc def", " ghi"]
    assert TextChunker(100).split("short") == ["short"]
    with pytest.raises(ValueError):
        TextChunker(0)


def _with(data: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def test_unsafe_tokenizers_are_refused(model_dir: Path) -> None:
    data = json.loads((model_dir / "tokenizer.json").read_text())
    pre = ["pre_tokenizer", "pretokenizers"]
    cases: list[tuple[list[Any], Any]] = [
        (["normalizer"], {"type": "NFC"}),
        (["truncation"], {"max_length": 8}),
        ([*pre, 0, "pattern", "Regex"], r"\s+|\S+"),
        ([*pre, 0, "behavior"], "Removed"),
        ([*pre, 0, "invert"], True),
        ([*pre, 1, "use_regex"], True),
        ([*pre, 1, "add_prefix_space"], True),
        (["model", "dropout"], 0.1),
        (["model", "type"], "Unigram"),
        (["added_tokens", 0, "lstrip"], True),
        (["added_tokens", 0, "content"], "<|a b|>"),
        (["pre_tokenizer"], {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}),
        (["pre_tokenizer"], None),
    ]
    for path, value in cases:
        assert chunking_unsafe_reason(_with(data, path, value)) is not None, path
