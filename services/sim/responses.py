"""vLLM 0.32's non-streamed response bodies, ids and the other endpoints' replies.

Bodies are msgspec Structs whose field order is vLLM's key order, encoded straight
to ``bytes``; every field is present, nulls included, as vLLM returns ``model_dump()``.
``docs/vllm-interfaces.md`` shows each shape.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from hashlib import sha256
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from .encoding import to_json

if TYPE_CHECKING:
    from .requests import GenerationRequest

__all__ = [
    "VLLM_VERSION",
    "ChatCompletionResponse",
    "CompletionResponse",
    "ModelCard",
    "ModelList",
    "chat_completion_response",
    "completion_response",
    "detokenize_response",
    "model_card",
    "models_response",
    "random_id",
    "response_id",
    "system_fingerprint",
    "tokenize_response",
    "version_response",
]

VLLM_VERSION = "0.32.0"


# -- ids --------------------------------------------------------------------------------


def random_id() -> str:
    """vLLM 0.32's ``random_uuid()``: 64 random bits as 16 hex digits."""
    return f"{random.getrandbits(64):016x}"


def response_id(
    kind: Literal["completion", "chat"],
    request: GenerationRequest,
    x_request_id: str | None = None,
) -> str:
    """``cmpl-``/``chatcmpl-`` + X-Request-Id, else the body's ``request_id``, else random hex."""
    base = x_request_id if x_request_id is not None else (request.request_id or random_id())
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + base


def system_fingerprint(model_name: str, salt: str = "") -> str:
    """A stable ``vllm-0.32.0-<8 hex>`` fingerprint, the shape of vLLM's default mode."""
    digest = sha256(f"{model_name}\x00{salt}".encode(errors="replace")).hexdigest()
    return f"vllm-{VLLM_VERSION}-{digest[:8]}"


# -- generation bodies ------------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct):
    """``usage.prompt_tokens_details`` in a non-streamed body."""

    cached_tokens: int | None = None
    created_cache_tokens: int | None = None
    multimodal_tokens: dict[str, int] | None = None


class Usage(msgspec.Struct):
    """``usage`` of a non-streamed body (vLLM's field order, nulls kept)."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: dict[str, int] | None = None


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        completion_tokens=completion_tokens,
        prompt_tokens_details=None if cached_tokens is None else PromptTokensDetails(cached_tokens),
    )


class CompletionChoice(msgspec.Struct):
    """One choice of a non-streamed completion."""

    index: int
    text: str
    logprobs: Any = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_logprobs: Any = None
    prompt_token_ids: list[int] | None = None
    routed_experts: str | None = None


class CompletionResponse(msgspec.Struct, kw_only=True):
    """A non-streamed ``/v1/completions`` body, fields in vLLM's key order."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    service_tier: str | None = None
    system_fingerprint: str | None = None
    usage: Usage
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None


def completion_response(
    request_id: str,
    model: str,
    text: str,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    finish_reason: str = "length",
    stop_reason: int | str | None = None,
    cached_tokens: int | None = None,
    created: int | None = None,
    system_fingerprint: str | None = None,
    kv_transfer_params: dict[str, Any] | None = None,
    token_ids: Sequence[int] | None = None,
    prompt_token_ids: Sequence[int] | None = None,
) -> bytes:
    """A one-choice non-streamed completion body.

    ``cached_tokens`` None gives ``"prompt_tokens_details": null`` (vLLM's default);
    an int gives ``{"cached_tokens": N, ...}`` (``--enable-prompt-tokens-details``).
    """
    choice = CompletionChoice(
        index=0,
        text=text,
        finish_reason=finish_reason,
        stop_reason=stop_reason,
        token_ids=None if token_ids is None else list(token_ids),
        prompt_token_ids=None if prompt_token_ids is None else list(prompt_token_ids),
    )
    response = CompletionResponse(
        id=request_id,
        created=int(time.time()) if created is None else created,
        model=model,
        choices=[choice],
        usage=_usage(prompt_tokens, completion_tokens, cached_tokens),
        system_fingerprint=system_fingerprint,
        kv_transfer_params=kv_transfer_params,
    )
    return to_json(response)


class ChatMessage(msgspec.Struct):
    """``choices[].message`` of a non-streamed chat completion (empty tool_calls dropped)."""

    role: str
    content: str | None = None
    refusal: str | None = None
    annotations: Any = None
    audio: Any = None
    function_call: Any = None
    reasoning: str | None = None


class ChatChoice(msgspec.Struct):
    """One choice of a non-streamed chat completion."""

    index: int
    message: ChatMessage
    logprobs: Any = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    routed_experts: str | None = None


class ChatCompletionResponse(msgspec.Struct, kw_only=True):
    """A non-streamed ``/v1/chat/completions`` body, fields in vLLM's key order."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    service_tier: str | None = None
    system_fingerprint: str | None = None
    usage: Usage
    prompt_logprobs: Any = None
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None


def chat_completion_response(
    request_id: str,
    model: str,
    content: str,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    finish_reason: str = "stop",
    stop_reason: int | str | None = None,
    cached_tokens: int | None = None,
    created: int | None = None,
    system_fingerprint: str | None = None,
    kv_transfer_params: dict[str, Any] | None = None,
    role: str = "assistant",
    token_ids: Sequence[int] | None = None,
    prompt_token_ids: Sequence[int] | None = None,
) -> bytes:
    """A one-choice non-streamed chat completion body (``cached_tokens`` as in
    :func:`completion_response`)."""
    choice = ChatChoice(
        index=0,
        message=ChatMessage(role=role, content=content),
        finish_reason=finish_reason,
        stop_reason=stop_reason,
        token_ids=None if token_ids is None else list(token_ids),
    )
    return to_json(
        ChatCompletionResponse(
            id=request_id,
            created=int(time.time()) if created is None else created,
            model=model,
            choices=[choice],
            system_fingerprint=system_fingerprint,
            usage=_usage(prompt_tokens, completion_tokens, cached_tokens),
            prompt_token_ids=None if prompt_token_ids is None else list(prompt_token_ids),
            kv_transfer_params=kv_transfer_params,
        )
    )


# -- models, tokenizer endpoints, version -------------------------------------------------


class ModelPermission(msgspec.Struct):
    """The single permission entry vLLM attaches to every model card."""

    id: str
    object: str
    created: int
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(msgspec.Struct):
    """One entry of ``GET /v1/models``."""

    id: str
    object: str
    created: int
    owned_by: str
    root: str | None
    parent: str | None
    max_model_len: int | None
    permission: list[ModelPermission]


class ModelList(msgspec.Struct):
    """``GET /v1/models``."""

    object: str
    data: list[ModelCard]


def model_card(
    model_id: str,
    *,
    root: str | None,
    max_model_len: int | None = None,
    parent: str | None = None,
    created: int | None = None,
) -> ModelCard:
    """A card for a base model (``max_model_len`` set) or a LoRA adapter (``parent`` set).

    vLLM builds cards per call, so ``created`` defaults to now and the
    permission id is random each time.
    """
    now = int(time.time()) if created is None else created
    return ModelCard(
        id=model_id,
        object="model",
        created=now,
        owned_by="vllm",
        root=root,
        parent=parent,
        max_model_len=max_model_len,
        permission=[
            ModelPermission(id=f"modelperm-{random_id()}", object="model_permission", created=now)
        ],
    )


def models_response(cards: Sequence[ModelCard]) -> bytes:
    """``{"object": "list", "data": [...]}``: base models first, then adapters."""
    return to_json(ModelList(object="list", data=list(cards)))


class _TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


def tokenize_response(
    tokens: Sequence[int], max_model_len: int, token_strs: Sequence[str] | None = None
) -> bytes:
    """``POST /tokenize`` reply: count, max_model_len, tokens, token_strs (null unless asked)."""
    return to_json(
        _TokenizeResponse(
            count=len(tokens),
            max_model_len=max_model_len,
            tokens=list(tokens),
            token_strs=None if token_strs is None else list(token_strs),
        )
    )


class _DetokenizeResponse(msgspec.Struct):
    prompt: str


def detokenize_response(text: str) -> bytes:
    """``POST /detokenize`` reply: ``{"prompt": text}``."""
    return to_json(_DetokenizeResponse(text))


def version_response() -> bytes:
    """``GET /version`` reply."""
    return b'{"version":"' + VLLM_VERSION.encode() + b'"}'
