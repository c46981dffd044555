"""Incremental (streaming) detokenization.

vLLM's fast path (``vllm/v1/engine/detokenizer.py``, ``FastIncrementalDetokenizer``)
feeds generated ids one at a time to ``tokenizers.decoders.DecodeStream``, primed
with the prompt ids, and appends whatever text each step yields. A step yields
nothing while the ids so far end inside a multi-byte UTF-8 character, so deltas
never contain broken characters. When the stream reports an "invalid prefix" it
is restarted without context.

:class:`IncrementalDetokenizer` does the same with ``DecodeStream`` when the
installed ``tokenizers`` has it, and otherwise falls back to the classic
prefix/read-offset algorithm built on full ``decode`` calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream as _DecodeStream
except ImportError:  # pragma: no cover - depends on the installed tokenizers
    _DecodeStream = None  # type: ignore[misc,assignment]

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turn a stream of generated token ids into text deltas.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        prompt_ids: the prompt's ids, used as left context so the first
            generated token decodes exactly as it would inside the full text.
        skip_special_tokens: drop special tokens from the output (vLLM default).
        use_decode_stream: use ``tokenizers``' ``DecodeStream`` when available
            (False forces the pure-Python fallback).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] | None = None,
        *,
        skip_special_tokens: bool = True,
        use_decode_stream: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._prompt = list(prompt_ids or ())
        self.token_ids: list[int] = []
        self.text = ""
        self._stream: Any = None
        if use_decode_stream and _DecodeStream is not None:
            self._stream = self._new_stream(self._prompt)
        else:
            # Fallback state: all ids so far (prompt tail included) and two offsets.
            context = self._prompt[-8:]
            self._ids = list(context)
            self._prefix_offset = 0
            self._read_offset = len(context)

    @property
    def uses_decode_stream(self) -> bool:
        """Whether the Rust ``DecodeStream`` backs this detokenizer."""
        return self._stream is not None

    def _new_stream(self, prompt: list[int]) -> Any:
        try:
            return _DecodeStream(ids=prompt or None, skip_special_tokens=self._skip)
        except TypeError:  # tokenizers < 0.22: no ``ids`` argument, prime by stepping
            stream = _DecodeStream(skip_special_tokens=self._skip)
            for token_id in prompt[-8:]:
                stream.step(self._tokenizer, token_id)
            return stream

    def _stream_step(self, token_id: int) -> str:
        try:
            chunk = self._stream.step(self._tokenizer, token_id)
        except Exception as exc:
            if "invalid prefix" not in str(exc).lower():
                raise
            self._stream = _DecodeStream(skip_special_tokens=self._skip)
            chunk = self._stream.step(self._tokenizer, token_id)
        return chunk or ""

    def _fallback_step(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset],
                        skip_special_tokens=self._skip)
        full = decode(self._ids[self._prefix_offset :], skip_special_tokens=self._skip)
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            delta = full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""

    def step(self, token_id: int) -> str:
        """Add one generated id; return the new text (possibly ``""``)."""
        self.token_ids.append(token_id)
        if self._stream is not None:
            delta = self._stream_step(token_id)
        else:
            delta = self._fallback_step(token_id)
        self.text += delta
        return delta

    def feed(self, token_ids: Iterable[int]) -> Iterator[str]:
        """Step through ``token_ids``, yielding each non-empty delta."""
        for token_id in token_ids:
            delta = self.step(token_id)
            if delta:
                yield delta
