"""The building blocks of vLLM 0.32's request bodies: the base model, stream options,
tools and the output constraints, with vLLM's field types and limits."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, Self, TypeAlias

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from pydantic.dataclasses import dataclass

from infermesh.libs.telemetry import get_logger

from .errors import invalid_request

log = get_logger("sim.requests")

#: ``VLLM_MAX_STOP_STRINGS``: most entries a ``stop`` list may hold.
MAX_STOP_STRINGS = 4
#: ``VLLM_MAX_COMPLETION_PROMPTS``: most prompts one completion request may batch.
MAX_COMPLETION_PROMPTS = 1024
#: ``VLLM_MAX_N_SEQUENCES``: vLLM's upper bound on ``n``.
MAX_N_SEQUENCES = 16384
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=0)]
StopParam: TypeAlias = str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None
XArgs: TypeAlias = dict[str, str | int | float | list[str | int | float]]
#: ``top_logprobs``: null means 0, as omitted.
TopLogprobs = Annotated[int, BeforeValidator(lambda v: 0 if v is None else v)]


class OpenAIBaseModel(BaseModel):
    """Unknown fields are kept, not refused, as in vLLM (which logs them at debug level)."""

    model_config = ConfigDict(extra="allow")

    # vLLM wraps every request model in a validator like this one; besides logging, it
    # makes pydantic name a union member "function-wrap[...]", which vLLM's error
    # report drops, so /tokenize errors read "body.prompt", not "body.<Model>.prompt".
    @model_validator(mode="wrap")
    @classmethod
    def _log_ignored_fields(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        result = handler(data)
        if isinstance(data, dict):
            known = {f.alias or name for name, f in cls.model_fields.items()}
            if ignored := data.keys() - known - cls.model_fields.keys():
                log.debug(
                    "request_fields_ignored", model=cls.__name__, fields=sorted(map(str, ignored))
                )
        return result


class StreamOptions(OpenAIBaseModel):
    """``stream_options``; vLLM 0.32 defaults ``include_usage`` to false."""

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


# -- tools -------------------------------------------------------------------------------


def _drop_unset_extras(model: BaseModel, data: dict[str, Any], *optional: str) -> dict[str, Any]:
    """vLLM hands a tool to the chat template as its declared fields, optional ones only if set."""
    kept = {k: v for k, v in data.items() if k in type(model).model_fields}
    return {k: v for k, v in kept.items() if not (k in optional and v is None)}


class FunctionDefinition(OpenAIBaseModel):
    """The function of a request tool."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: bool | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _drop_unset_extras(self, handler(self), "strict", "defer_loading")


class ChatCompletionToolsParam(OpenAIBaseModel):
    """One entry of ``tools``."""

    type: Literal["function"] = "function"
    function: FunctionDefinition
    defer_loading: bool | None = None

    @model_validator(mode="after")
    def _propagate_defer_loading(self) -> Self:
        if self.defer_loading is not None and self.function.defer_loading is None:
            self.function.defer_loading = self.defer_loading
        return self

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _drop_unset_extras(self, handler(self), "defer_loading")


class ChatCompletionNamedFunction(OpenAIBaseModel):
    """The function a named ``tool_choice`` names."""

    name: str


class ChatCompletionNamedToolChoiceParam(OpenAIBaseModel):
    """``tool_choice`` naming one function."""

    function: ChatCompletionNamedFunction
    type: Literal["function"] = "function"


# -- output constraints (accepted and checked like vLLM's; not simulated) --------------------


class JsonSchemaResponseFormat(OpenAIBaseModel):
    """The schema of a ``json_schema`` response format."""

    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    """``response_format`` of type text, json_object or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaResponseFormat | None = None


class StructuralTagResponseFormat(OpenAIBaseModel):
    """``response_format`` of type structural_tag."""

    type: Literal["structural_tag"]
    format: Any


class LegacyStructuralTag(OpenAIBaseModel):
    """One structure of a legacy structural tag."""

    begin: str
    structural_tag_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    end: str


class LegacyStructuralTagResponseFormat(OpenAIBaseModel):
    """The legacy structural_tag ``response_format``."""

    type: Literal["structural_tag"]
    structures: list[LegacyStructuralTag]
    triggers: list[str]


AnyResponseFormat: TypeAlias = (
    ResponseFormat | StructuralTagResponseFormat | LegacyStructuralTagResponseFormat
)


@dataclass
class StructuredOutputsParams:
    """``structured_outputs``: exactly one kind of constraint."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    _backend: str | None = dataclasses.field(default=None, init=False)
    _backend_was_auto: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self) -> None:
        kinds = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
        count = sum(getattr(self, k) is not None for k in kinds)
        if count > 1:
            raise invalid_request(
                "You can only use one kind of structured outputs constraint "
                f"but multiple are specified: {self.__dict__}"
            )
        if count < 1:
            raise invalid_request(
                "You must use one kind of structured outputs constraint "
                f"but none are specified: {self.__dict__}"
            )


@dataclass
class RepetitionDetectionParams:
    """``repetition_detection``: stop on a repeated n-gram."""

    max_pattern_size: int = 0
    min_pattern_size: int = 0
    min_count: int = 0

    def __post_init__(self) -> None:
        if (
            self.max_pattern_size < 0
            or self.min_pattern_size < 0
            or self.min_pattern_size > self.max_pattern_size
        ):
            raise invalid_request(
                "max_pattern_size, min_pattern_size must be >=0, with min_pattern_size <= "
                "max_pattern_size. Set both to 0 to disable repetitive pattern detection."
            )
        if self.max_pattern_size > 0 and self.min_count < 2:
            raise invalid_request(
                "min_count must be >= 2 to detect repetitive patterns in engine output. If you "
                "do not wish to detect repetitive patterns, set max_pattern_size to 0."
            )


def _thinking_budget(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool | float) or not isinstance(value, int) or value < -1:
        raise invalid_request(
            "`thinking_token_budget` must be a non-negative integer or -1 for unlimited.",
            "thinking_token_budget",
            value,
        )
    return None if value == -1 else value


ThinkingTokenBudget = Annotated[int | None, BeforeValidator(_thinking_budget)]
