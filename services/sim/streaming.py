"""vLLM 0.32's streamed (SSE) responses, the simulator's hot path.

:class:`CompletionStream` and :class:`ChatStream` precompute the constant byte prefix
of every event and encode only the delta text per token. Chunks leave out the fields
vLLM never sets (``model_dump_json(exclude_unset=True)``), so their shapes differ by
position in the stream; ``docs/vllm-interfaces.md`` lists them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Self

import msgspec

from .encoding import ENCODER, NULL, to_json

if TYPE_CHECKING:
    from .requests import GenerationRequest

__all__ = ["SSE_DONE", "ChatStream", "CompletionStream"]

SSE_DONE = b"data: [DONE]\n\n"


class _StreamPromptDetails(msgspec.Struct, omit_defaults=True):
    cached_tokens: int | None = None


class _StreamFinalUsage(msgspec.Struct, omit_defaults=True):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int
    prompt_tokens_details: _StreamPromptDetails | None = None


class _UsageChunk(msgspec.Struct, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[Any]
    usage: _StreamFinalUsage
    system_fingerprint: str | None = None


class _StreamBase:
    """Shared state of one SSE response: id, counters and the byte prefix of every event."""

    _object = ""

    def __init__(
        self,
        request_id: str,
        model: str,
        *,
        created: int | None = None,
        prompt_tokens: int = 0,
        include_usage: bool = False,
        continuous_usage: bool = False,
        system_fingerprint: str | None = None,
    ) -> None:
        """Precompute the event prefix; ``continuous_usage`` only counts with ``include_usage``."""
        self.request_id = request_id
        self.model = model
        self.created = int(time.time()) if created is None else created
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.include_usage = include_usage
        self.continuous_usage = include_usage and continuous_usage
        self.system_fingerprint = system_fingerprint
        self._head = b"".join(
            (
                b'data: {"id":',
                to_json(request_id),
                b',"object":"',
                self._object.encode(),
                b'","created":',
                str(self.created).encode(),
                b',"model":',
                to_json(model),
                b',"choices":[',
            )
        )
        # A fingerprint rides on the terminal chunk only when no usage chunk follows.
        self._fp_tail = (
            b',"system_fingerprint":' + to_json(system_fingerprint) + b"}\n\n"
            if system_fingerprint is not None and not include_usage
            else b"}\n\n"
        )

    @classmethod
    def for_request(
        cls,
        request: GenerationRequest,
        request_id: str,
        model: str,
        **kwargs: Any,
    ) -> Self:
        """Build the stream with ``include_usage``/``continuous_usage`` from ``stream_options``."""
        opts = request.stream_options
        return cls(
            request_id,
            model,
            include_usage=bool(opts and opts.include_usage),
            continuous_usage=bool(opts and opts.continuous_usage_stats),
            **kwargs,
        )

    def _usage_bytes(self) -> bytes:
        p, c = self.prompt_tokens, self.completion_tokens
        return b'"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d' % (
            p,
            p + c,
            c,
        )

    def usage(self, cached_tokens: int | None = None) -> bytes:
        """The final usage event (``choices: []``); send it only when ``include_usage``.

        ``cached_tokens`` adds ``prompt_tokens_details.cached_tokens``, which vLLM
        includes only with ``--enable-prompt-tokens-details``; pass None to omit it.
        """
        chunk = _UsageChunk(
            id=self.request_id,
            object=self._object,
            created=self.created,
            model=self.model,
            choices=[],
            usage=_StreamFinalUsage(
                prompt_tokens=self.prompt_tokens,
                total_tokens=self.prompt_tokens + self.completion_tokens,
                completion_tokens=self.completion_tokens,
                prompt_tokens_details=None
                if cached_tokens is None
                else _StreamPromptDetails(cached_tokens),
            ),
            system_fingerprint=self.system_fingerprint,
        )
        return b"data: " + to_json(chunk) + b"\n\n"

    @staticmethod
    def done() -> bytes:
        """The closing ``data: [DONE]`` event."""
        return SSE_DONE


def _ids(token_ids: Sequence[int] | None) -> bytes:
    return NULL if token_ids is None else ENCODER.encode(list(token_ids))


def _reason(value: int | str | None) -> bytes:
    return NULL if value is None else to_json(value)


class CompletionStream(_StreamBase):
    """SSE events of one streamed ``/v1/completions`` response (choice 0 unless told).

    Event sequence: :meth:`chunk` per output delta (the last one with a
    ``finish_reason``), then :meth:`usage` if ``include_usage``, then :meth:`done`.
    """

    _object = "text_completion"

    def chunk(
        self,
        text: str,
        *,
        tokens: int = 1,
        finish_reason: str | None = None,
        stop_reason: int | str | None = None,
        index: int = 0,
        token_ids: Sequence[int] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
    ) -> bytes:
        """One ``text_completion`` chunk carrying ``tokens`` new tokens of ``text``.

        ``token_ids``/``prompt_token_ids`` are for ``return_token_ids`` requests
        (prompt ids on the first chunk only); otherwise they encode as null.
        """
        self.completion_tokens += tokens
        parts = [
            self._head,
            b'{"index":%d,"text":' % index,
            to_json(text),
            b',"logprobs":null,"finish_reason":',
            NULL if finish_reason is None else to_json(finish_reason),
            b',"stop_reason":',
            _reason(stop_reason),
            b',"prompt_token_ids":',
            _ids(prompt_token_ids),
            b',"token_ids":',
            _ids(token_ids),
            b"}]",
        ]
        if self.continuous_usage:
            parts += (b",", self._usage_bytes(), b"}")
        parts.append(self._fp_tail if finish_reason is not None else b"}\n\n")
        return b"".join(parts)


class ChatStream(_StreamBase):
    """SSE events of one streamed ``/v1/chat/completions`` response (choice 0 unless told).

    Event sequence: :meth:`first` (role, empty content), optionally
    :meth:`echo`, :meth:`chunk` per content delta (the last one with a
    ``finish_reason``), then :meth:`usage` if ``include_usage``, then :meth:`done`.
    """

    _object = "chat.completion.chunk"

    def _chat_usage(self) -> bytes:
        return b"," + self._usage_bytes() + b',"completion_tokens_details":null}'

    def first(
        self,
        role: str = "assistant",
        *,
        index: int = 0,
        prompt_token_ids: Sequence[int] | None = None,
    ) -> bytes:
        """The opening chunk: ``delta: {role, content: ""}`` plus ``prompt_token_ids``."""
        parts = [
            self._head,
            b'{"index":%d,"delta":{"role":' % index,
            to_json(role),
            b',"content":""},"logprobs":null,"finish_reason":null}]',
        ]
        if self.continuous_usage:
            parts.append(self._chat_usage())
        parts += (b',"prompt_token_ids":', _ids(prompt_token_ids), b',"prompt_text":null}\n\n')
        return b"".join(parts)

    def echo(self, content: str, *, index: int = 0) -> bytes:
        """The chunk repeating the last message's content for ``echo: true`` requests."""
        parts = [
            self._head,
            b'{"index":%d,"delta":{"content":' % index,
            to_json(content),
            b'},"logprobs":null,"finish_reason":null}]',
        ]
        if self.continuous_usage:
            parts.append(self._chat_usage())
        parts.append(b"}\n\n")
        return b"".join(parts)

    def chunk(
        self,
        text: str,
        *,
        tokens: int = 1,
        finish_reason: str | None = None,
        stop_reason: int | str | None = None,
        index: int = 0,
        token_ids: Sequence[int] | None = None,
    ) -> bytes:
        """One ``chat.completion.chunk``: ``delta: {content}``; ``stop_reason`` once finished."""
        self.completion_tokens += tokens
        parts = [
            self._head,
            b'{"index":%d,"delta":{"content":' % index,
            to_json(text),
            b'},"logprobs":null,"finish_reason":',
        ]
        if finish_reason is None:
            parts.append(b"null")
        else:
            parts += (to_json(finish_reason), b',"stop_reason":', _reason(stop_reason))
        parts += (b',"token_ids":', _ids(token_ids), b"}]")
        if self.continuous_usage:
            parts.append(self._chat_usage())
        parts.append(self._fp_tail if finish_reason is not None else b"}\n\n")
        return b"".join(parts)
