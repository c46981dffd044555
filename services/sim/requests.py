"""vLLM 0.32's OpenAI request bodies as pydantic models.

Field names, types, defaults, constraints and field order follow vLLM's own request
models (``entrypoints/openai/completion/protocol.py``, ``.../chat_completion/protocol.py``,
``entrypoints/serve/tokenize/protocol.py``), so pydantic refuses a wrong body with the
very errors vLLM's server lists, in the same order. Before the fields, each model runs
vLLM's checks of the raw body (:mod:`.request_checks`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self, TypeAlias, cast

from pydantic import Field, model_validator

from .messages import ChatCompletionMessageParam
from .request_checks import CHAT_CHECKS, COMPLETION_CHECKS, TOKENIZE_CHAT_CHECKS, run_checks
from .request_parts import (
    INT64_MAX,
    MAX_COMPLETION_PROMPTS,
    MAX_N_SEQUENCES,
    MAX_STOP_STRINGS,
    AnyResponseFormat,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionToolsParam,
    Int64,
    OpenAIBaseModel,
    RepetitionDetectionParams,
    ResponseFormat,
    StopParam,
    StreamOptions,
    StructuredOutputsParams,
    ThinkingTokenBudget,
    TokenId,
    TopLogprobs,
    XArgs,
)
from .responses import random_id

__all__ = [
    "MAX_COMPLETION_PROMPTS",
    "MAX_N_SEQUENCES",
    "MAX_STOP_STRINGS",
    "ChatCompletionNamedToolChoiceParam",
    "ChatCompletionRequest",
    "ChatCompletionToolsParam",
    "CompletionRequest",
    "DetokenizeRequest",
    "GenerationRequest",
    "ResponseFormat",
    "StreamOptions",
    "StructuredOutputsParams",
    "TokenizeChatRequest",
    "TokenizeCompletionRequest",
    "TokenizeRequest",
]


# -- /v1/completions ----------------------------------------------------------------------


class CompletionRequest(OpenAIBaseModel):
    """``POST /v1/completions``."""

    model: str | None = None
    prompt: list[TokenId] | list[list[TokenId]] | str | list[str] | None = None
    echo: bool | None = False
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    max_tokens: int | None = 16
    n: int = 1
    presence_penalty: float | None = None
    seed: Int64 | None = None
    stop: StopParam = Field(default_factory=list)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # vLLM's sampling extensions
    use_beam_search: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    watermarking: bool | None = None
    length_penalty: float = 1.0
    stop_token_ids: list[int] | None = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    logprob_token_ids: list[int] | None = None
    bad_words: list[str] = Field(default_factory=list)
    # vLLM's request extensions
    prompt_embeds: bytes | list[bytes] | None = None
    add_special_tokens: bool = True
    response_format: AnyResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    priority: Int64 = 0
    request_id: str = Field(default_factory=random_id)
    session_id: str | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    routed_experts_prompt_start: Annotated[int, Field(ge=0)] = 0
    return_token_offsets: bool | None = False
    mm_payload: Literal["tensors", "none"] = "tensors"
    return_mm_kwargs: bool | None = None
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    vllm_xargs: XArgs | None = None
    repetition_detection: RepetitionDetectionParams | None = None
    thinking_token_budget: ThinkingTokenBudget = None
    stream_interval: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _vllm_checks(cls, data: Any) -> Any:
        return run_checks(COMPLETION_CHECKS, data)


# -- /v1/chat/completions -----------------------------------------------------------------


class ChatCompletionRequest(OpenAIBaseModel):
    """``POST /v1/chat/completions``."""

    messages: list[ChatCompletionMessageParam]
    model: str | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    top_logprobs: TopLogprobs = 0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = 1
    presence_penalty: float | None = None
    response_format: AnyResponseFormat | None = None
    seed: Int64 | None = None
    stop: StopParam = Field(default_factory=list)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[ChatCompletionToolsParam] | None = None
    tool_choice: (
        Literal["none"]
        | Literal["auto"]
        | Literal["required"]
        | ChatCompletionNamedToolChoiceParam
        | None
    ) = "none"
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = (
        None
    )
    thinking_token_budget: ThinkingTokenBudget = None
    include_reasoning: bool = True
    parallel_tool_calls: bool | None = True
    user: str | None = None
    # vLLM's sampling extensions
    use_beam_search: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    watermarking: bool | None = None
    length_penalty: float = 1.0
    stop_token_ids: list[int] | None = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    prompt_logprobs: int | None = None
    logprob_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = Field(default_factory=list)
    # vLLM's request extensions
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, dict[str, Any]] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    priority: Int64 = 0
    request_id: str = Field(default_factory=random_id)
    session_id: str | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    routed_experts_prompt_start: Annotated[int, Field(ge=0)] = 0
    return_token_offsets: bool | None = False
    return_prompt_text: bool | None = None
    mm_payload: Literal["tensors", "none"] = "tensors"
    return_mm_kwargs: bool | None = None
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    vllm_xargs: XArgs | None = None
    repetition_detection: RepetitionDetectionParams | None = None
    stream_interval: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _vllm_checks(cls, data: Any) -> Any:
        return run_checks(CHAT_CHECKS, data)

    @model_validator(mode="after")
    def _list_tool_calls(self) -> Self:
        # pydantic checks an Iterable lazily; vLLM reads assistant tool calls right away.
        for msg in self.messages:
            if isinstance(msg, dict):
                fields = cast(dict[str, Any], msg)
                calls = fields.get("tool_calls")
                if calls is not None and not isinstance(calls, list):
                    fields["tool_calls"] = list(calls)
        return self


GenerationRequest: TypeAlias = CompletionRequest | ChatCompletionRequest


# -- /tokenize, /detokenize ---------------------------------------------------------------


class TokenizeCompletionRequest(OpenAIBaseModel):
    """``POST /tokenize`` with a ``prompt``."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(OpenAIBaseModel):
    """``POST /tokenize`` with ``messages`` (rendered through the chat template)."""

    model: str | None = None
    messages: list[ChatCompletionMessageParam]
    add_generation_prompt: bool = True
    return_token_strs: bool | None = False
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, dict[str, Any]] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    tools: list[ChatCompletionToolsParam] | None = None

    @model_validator(mode="before")
    @classmethod
    def _vllm_checks(cls, data: Any) -> Any:
        return run_checks(TOKENIZE_CHAT_CHECKS, data)


#: vLLM's ``/tokenize`` body: the completion form is tried first.
TokenizeRequest: TypeAlias = TokenizeCompletionRequest | TokenizeChatRequest


class DetokenizeRequest(OpenAIBaseModel):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=INT64_MAX)]]
