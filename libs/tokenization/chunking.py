"""Where a text may be cut so that its pieces tokenize to exactly the ids of the whole.

A byte-level BPE tokenizer in the Llama-3 style (``tokenizer.json``: no normalizer, special
tokens split out first, then ``Split(regex, Isolated)`` and ``ByteLevel(use_regex=False)``, then
BPE per piece) is *piece-local*: the ids of a text are the concatenation of the BPE of each
regex piece. So if ``text[:p]`` and ``text[p:]`` split into the same pieces as ``text`` does left
and right of ``p``, then ``encode(text) == encode(text[:p]) + encode(text[p:])`` (without the
post-processor's BOS, which goes around the whole).

Two boundary rules hold for the Llama-3 split pattern (and Qwen2's, which differs only in
``\\p{N}`` vs ``\\p{N}{1,3}``):

1. ``text[p-1] == "\\n"`` and ``text[p]`` is not whitespace. In the pattern only ``\\s*``,
   ``\\s+``, ``[\\r\\n]+`` and ``[\\r\\n]*`` can consume a newline. A match attempt that reaches
   ``p`` has consumed ``text[p-1]`` with one of them and then tests ``text[p]``: every such test
   fails on a non-space char exactly as it fails at the end of the string, so the attempt takes
   the same path in ``text`` and in ``text[:p]`` — except ``\\s+(?!\\S)``, whose lookahead would
   differ. But that alternative is only tried when ``\\s*[\\r\\n]+`` failed at the same start,
   and ``\\s*[\\r\\n]+`` succeeds wherever ``\\s+`` could run up to a newline. Hence the match
   covering ``p-1`` ends exactly at ``p`` and every earlier match is unchanged; the pattern has
   no lookbehind or anchors, so matching from ``p`` in ``text`` equals matching ``text[p:]``.
2. ``text[p-1]`` is an ASCII letter and ``text[p] == " "``. Only ``\\p{L}+`` and the
   contractions (``'s``, ``'re``, ...) consume a letter; reading ``text[p]`` they test for a
   letter, which fails on a space as at the end of the string. The match covering ``p-1`` ends
   at ``p``, and the rest follows as in rule 1.

Special (added) tokens are matched before the regex; a match crossing ``p`` would contain
``text[p-1:p+1]``, whitespace included, so added tokens holding whitespace (or using
``lstrip``/``rstrip``/``single_word``, which absorb neighbouring whitespace) disable chunking.
:func:`chunking_unsafe_reason` checks every one of these preconditions on a ``tokenizer.json``;
where one fails, the caller tokenizes texts whole.

Python's ``\\s`` is ``str.isspace``, a superset of Unicode ``White_Space`` (what the tokenizer's
Oniguruma ``\\s`` matches), so rule 1 never cuts before a char the tokenizer sees as a space;
U+180E, White_Space in old Unicode versions, is excluded too.
"""

from __future__ import annotations

import re
from typing import Any

#: Split patterns the boundary rules are proven for (Llama-3 family, Qwen2 family).
SAFE_SPLIT_PATTERNS: frozenset[str] = frozenset(
    {
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    }
)

# Rule 1: after a newline, before a non-space. Rule 2: after an ASCII letter, before a space.
_BOUNDARY = re.compile(r"(?<=\n)(?=[^\s\u180e])|(?<=[A-Za-z])(?= )")


def chunking_unsafe_reason(tokenizer_json: dict[str, Any]) -> str | None:
    """Why the boundary rules do not hold for this ``tokenizer.json`` (None: they hold)."""
    if tokenizer_json.get("normalizer") is not None:
        return "the tokenizer has a normalizer"
    if tokenizer_json.get("truncation") is not None or tokenizer_json.get("padding") is not None:
        return "the tokenizer truncates or pads"
    pre = tokenizer_json.get("pre_tokenizer")
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" \
        else [pre]
    if not isinstance(steps, list) or not steps or not isinstance(steps[0], dict):
        return "the pre-tokenizer is not a regex split"
    split = steps[0]
    pattern = split.get("pattern")
    if (
        split.get("type") != "Split"
        or not isinstance(pattern, dict)
        or pattern.get("Regex") not in SAFE_SPLIT_PATTERNS
        or split.get("behavior") != "Isolated"
        or split.get("invert")
    ):
        return "the pre-tokenizer's split pattern is not one the boundary rules are proven for"
    for step in steps[1:]:
        if not (
            isinstance(step, dict)
            and step.get("type") == "ByteLevel"
            and not step.get("add_prefix_space")
            and not step.get("use_regex")
        ):
            return "a pre-tokenizer step after the split is not a plain ByteLevel"
    model = tokenizer_json.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("dropout"):
        return "the model is not a deterministic BPE"
    for added in tokenizer_json.get("added_tokens") or []:
        content = str(added.get("content", ""))
        if added.get("lstrip") or added.get("rstrip") or added.get("single_word"):
            return f"added token {content!r} strips or matches whole words"
        if any(ch.isspace() for ch in content):
            return f"added token {content!r} holds whitespace"
    return None


class TextChunker:
    """Cuts texts into chunks of at least ``min_chars`` at the first safe boundary after that.

    The cut points depend only on the text before them (and the one char after), so two texts
    sharing a prefix share every chunk that ends inside it.
    """

    def __init__(self, min_chars: int) -> None:
        if min_chars < 1:
            raise ValueError(f"min_chars must be >= 1, got {min_chars}")
        self.min_chars = min_chars

    def first_cut(self, text: str) -> int | None:
        """Where :meth:`split` cuts ``text`` first (None: it does not)."""
        if len(text) <= self.min_chars:
            return None
        m = _BOUNDARY.search(text, self.min_chars)
        return None if m is None else m.start()

    def split(self, text: str) -> list[str]:
        """``text`` as consecutive chunks (one chunk when it is short or has no boundary)."""
        out: list[str] = []
        start = 0
        n = len(text)
        search = _BOUNDARY.search
        while n - start > self.min_chars:
            m = search(text, start + self.min_chars)
            if m is None:
                break
            cut = m.start()
            out.append(text[start:cut])
            start = cut
        out.append(text[start:])
        return out


def boundaries(text: str) -> list[int]:
    """Every safe cut point of ``text`` (for tests and tools)."""
    return [m.start() for m in _BOUNDARY.finditer(text)]
