"""Checking a request body the way a vLLM 0.32 server does, in its order.

JSON parse (FastAPI's errors) → Content-Type (vLLM's dependency) → the request model
(:mod:`.requests`: vLLM's raw-body checks, then pydantic's field validation) → the model
name (the server's check, passed in) → the output budget against the context → vLLM's
``SamplingParams`` checks. The prompt length is checked once the prompt is tokenized
(:func:`check_prompt_length`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from typing import Any, Literal, overload

import msgspec
from pydantic import TypeAdapter, ValidationError

from .errors import (
    RequestError,
    invalid_request,
    json_invalid,
    parse_failure,
    schema_error,
    unsupported_media_type,
)
from .requests import (
    MAX_N_SEQUENCES,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerationRequest,
    ResponseFormat,
    StructuredOutputsParams,
    TokenizeRequest,
)

__all__ = [
    "RequestKind",
    "check_prompt_length",
    "decode_request",
    "resolve_max_tokens",
    "structured_outputs",
]

RequestKind = Literal["completion", "chat", "tokenize", "detokenize"]

_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "completion": TypeAdapter(CompletionRequest),
    "chat": TypeAdapter(ChatCompletionRequest),
    "tokenize": TypeAdapter(TokenizeRequest),
    "detokenize": TypeAdapter(DetokenizeRequest),
}


@overload
def decode_request(
    body: bytes,
    kind: Literal["completion"],
    *,
    content_type: str | None = ...,
    max_model_len: int | None = ...,
    max_n: int = ...,
    check_model: Callable[[str | None], object] | None = ...,
) -> CompletionRequest: ...
@overload
def decode_request(
    body: bytes,
    kind: Literal["chat"],
    *,
    content_type: str | None = ...,
    max_model_len: int | None = ...,
    max_n: int = ...,
    check_model: Callable[[str | None], object] | None = ...,
) -> ChatCompletionRequest: ...
@overload
def decode_request(
    body: bytes,
    kind: Literal["tokenize"],
    *,
    content_type: str | None = ...,
    max_model_len: int | None = ...,
    max_n: int = ...,
    check_model: Callable[[str | None], object] | None = ...,
) -> TokenizeRequest: ...
@overload
def decode_request(
    body: bytes,
    kind: Literal["detokenize"],
    *,
    content_type: str | None = ...,
    max_model_len: int | None = ...,
    max_n: int = ...,
    check_model: Callable[[str | None], object] | None = ...,
) -> DetokenizeRequest: ...
def decode_request(
    body: bytes,
    kind: RequestKind,
    *,
    content_type: str | None = None,
    max_model_len: int | None = None,
    max_n: int = 1,
    check_model: Callable[[str | None], object] | None = None,
) -> Any:
    """Parse and check one request body the way vLLM 0.32 does, in vLLM's order.

    ``content_type`` is the request's Content-Type (``""`` when absent); ``None`` skips
    vLLM's application/json check. With ``max_model_len`` the output budget is checked
    against the context length. ``max_n`` caps ``n`` (vLLM allows
    :data:`~.requests.MAX_N_SEQUENCES`; the simulator serves ``n == 1`` by default).
    ``check_model`` (the server's check of the ``model`` name) runs where vLLM checks the
    model: after the body's schema, before the output budget and the sampling parameters.

    Raises:
        RequestError: for every refused body, whatever the bytes; no other exception.
    """
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        raise ValueError(f"unknown request kind {kind!r}")
    try:
        data = _read_body(body, content_type)
        try:
            request = adapter.validate_python(data, from_attributes=True)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            raise schema_error([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None
        if check_model is not None:
            check_model(request.model)
        if isinstance(request, CompletionRequest | ChatCompletionRequest):
            _check_generation(request, max_model_len, max_n)
        return request
    except RequestError:
        raise
    except RecursionError:
        raise parse_failure() from None
    except Exception as exc:  # never let odd input escape as a 500
        raise RequestError(400, f"Invalid request: {type(exc).__name__}") from None


def _read_body(body: bytes, content_type: str | None) -> Any:
    """The JSON value FastAPI hands to validation (``None``: no body), after vLLM's
    Content-Type check."""
    json_like = True
    if content_type is not None:
        # FastAPI parses only a JSON media type (application/json, */*+json) and, with
        # no Content-Type at all, nothing; then vLLM refuses all but application/json.
        main, _, rest = content_type.partition("/")
        sub = rest.split(";", 1)[0].strip().lower()
        json_like = main.strip().lower() == "application" and (
            sub == "json" or sub.endswith("+json")
        )
    data = _parse_json(body) if body and json_like else None
    if content_type is not None and content_type.lower().split(";", 1)[0] != "application/json":
        raise unsupported_media_type()
    if data is None:
        raise schema_error(
            [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        )
    return data


def _parse_json(body: bytes) -> Any:
    """Decode JSON with msgspec; on failure reproduce Python's json semantics and errors."""
    try:
        return msgspec.json.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
        pass
    # Starlette decodes with json.loads, which also takes NaN, Infinity, big
    # exponents, lone surrogates and a UTF-8 BOM; errors keep its wording.
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise json_invalid(exc.pos, exc.msg) from None
    except Exception:  # not UTF-8, nested too deep, ...
        raise parse_failure() from None
    return _replace_lone_surrogates(data)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace_lone_surrogates(data: Any) -> Any:
    """Swap unpaired surrogates (legal in JSON escapes, not in UTF-8) for U+FFFD."""

    def fix(s: str) -> str:
        return _SURROGATE.sub("\ufffd", s)

    if isinstance(data, str):
        return fix(data)
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            for i, item in enumerate(node):
                if isinstance(item, str):
                    node[i] = fix(item)
                elif isinstance(item, list | dict):
                    stack.append(item)
        elif isinstance(node, dict):
            for key in list(node):
                value = node[key]
                if isinstance(value, str):
                    value = fix(value)
                elif isinstance(value, list | dict):
                    stack.append(value)
                if isinstance(key, str) and _SURROGATE.search(key):
                    del node[key]
                    node[fix(key)] = value
                else:
                    node[key] = value
    return data


# -- vLLM's serving-time checks (output budget, sampling parameters) ---------------------


def _requested_tokens(request: GenerationRequest) -> tuple[int | None, str]:
    """The output budget the client asked for, and the field that asked."""
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        return request.max_completion_tokens, "max_completion_tokens"
    return request.max_tokens, "max_tokens"


def _check_generation(request: GenerationRequest, max_model_len: int | None, max_n: int) -> None:
    asked, param = _requested_tokens(request)
    if asked is not None and max_model_len is not None and asked > max_model_len:
        raise invalid_request(
            f"{param}={asked} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.",
            param,
            asked,
        )
    # echo with max_tokens == 0 returns the prompt only; vLLM then samples one token.
    if isinstance(request, CompletionRequest) and request.echo and asked == 0:
        asked = 1
    _check_sampling(request, asked, max_n)


def structured_outputs(req: GenerationRequest) -> StructuredOutputsParams | None:
    """The request's output constraint as vLLM hands it to ``SamplingParams``.

    vLLM folds ``response_format`` into ``structured_outputs``; the result must hold
    exactly one kind of constraint (a :class:`RequestError` otherwise).
    """
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return req.structured_outputs
    overrides: dict[str, Any]
    if fmt.type == "json_object":
        overrides = {"json_object": True}
    elif isinstance(fmt, ResponseFormat):
        overrides = {"json": fmt.json_schema.json_schema if fmt.json_schema else None}
    else:
        overrides = {"structural_tag": fmt.model_dump_json(by_alias=True)}
    if req.structured_outputs is None:
        return StructuredOutputsParams(**overrides)
    return dataclasses.replace(req.structured_outputs, **overrides)


def _check_sampling(req: GenerationRequest, max_tokens: int | None, max_n: int) -> None:
    """vLLM's SamplingParams checks on the values the client sent, in vLLM's order."""
    structured_outputs(req)
    n = 1 if req.n is None else req.n
    if n < 1:
        raise invalid_request(f"n must be at least 1, got {n}.")
    if n > max_n:
        hint = (
            " To increase this limit, set the VLLM_MAX_N_SEQUENCES environment variable."
            if max_n == MAX_N_SEQUENCES
            else ""
        )
        raise invalid_request(f"n must be at most {max_n}, got {n}.{hint}")
    _check_extra_args(req)
    if req.presence_penalty is not None and not -2.0 <= req.presence_penalty <= 2.0:
        raise invalid_request(f"presence_penalty must be in [-2, 2], got {req.presence_penalty}.")
    if req.frequency_penalty is not None and not -2.0 <= req.frequency_penalty <= 2.0:
        raise invalid_request(f"frequency_penalty must be in [-2, 2], got {req.frequency_penalty}.")
    rep = req.repetition_penalty
    if rep is not None and not math.isfinite(rep):
        raise invalid_request(f"repetition_penalty must be a finite number, got {rep}.")
    if rep is not None and rep <= 0.0:
        raise invalid_request(f"repetition_penalty must be greater than zero, got {rep}.")
    temp = req.temperature
    if temp is not None:
        if not math.isfinite(temp):
            raise invalid_request(
                f"temperature must be a finite number, got {temp}.", "temperature", temp
            )
        if temp < 0.0:
            raise invalid_request(
                f"temperature must be non-negative, got {temp}.", "temperature", temp
            )
        if temp > 2.0:
            raise invalid_request(
                f"temperature must be in [0, 2], got {temp}.", "temperature", temp
            )
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise invalid_request(f"top_p must be in (0, 1], got {req.top_p}.", "top_p", req.top_p)
    if req.top_k is not None and req.top_k < -1:
        raise invalid_request(f"top_k must be 0 (disable), or at least 1, got {req.top_k}.")
    if req.min_p is not None and not 0.0 <= req.min_p <= 1.0:
        raise invalid_request(f"min_p must be in [0, 1], got {req.min_p}.")
    if max_tokens is not None and max_tokens < 1:
        raise invalid_request(
            f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens
        )
    if req.min_tokens < 0:
        raise invalid_request(
            f"min_tokens must be greater than or equal to 0, got {req.min_tokens}."
        )
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise invalid_request(
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
            f"got {req.min_tokens}."
        )
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if any(not s for s in stop):
        raise invalid_request("stop cannot contain an empty string.")
    if any(not w for w in req.bad_words):
        raise invalid_request(
            f"bad_words cannot contain an empty string. Got bad_words={req.bad_words}"
        )


def _check_extra_args(req: GenerationRequest) -> None:
    """Integers bound for the engine (``vllm_xargs``, transfer params) must fit 64 bits."""
    pending: list[Any] = [req.vllm_xargs, req.kv_transfer_params, req.ec_transfer_params]
    while pending:
        value = pending.pop()
        if isinstance(value, int) and not -(2**63) <= value < 2**64:
            raise invalid_request(
                "extra_args integers must be between -2**63 and 2**64 - 1.", "extra_args"
            )
        if isinstance(value, dict):
            pending.extend(value)
            pending.extend(value.values())
        elif isinstance(value, list | tuple):
            pending.extend(value)


def check_prompt_length(prompt_tokens: int, max_model_len: int) -> None:
    """Refuse a prompt longer than the context, with vLLM's message (400, ``input_tokens``).

    vLLM tokenizes a text prompt with truncation to ``max_model_len + 1`` tokens, so a
    count of exactly that many reads "at least"; callers cap a text prompt's count there.
    """
    if prompt_tokens > max_model_len:
        qualifier = "at least " if prompt_tokens == max_model_len + 1 else ""
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt contains {qualifier}{prompt_tokens} input tokens, which exceeds this "
            "limit even without any output tokens. Please reduce the length of the input prompt.",
            "input_tokens",
            prompt_tokens,
        )


def resolve_max_tokens(request: GenerationRequest, prompt_tokens: int, max_model_len: int, *,
                       default_max_tokens: int | None = None) -> int:
    """The output budget vLLM grants: the request's limit (else the model's
    ``default_max_tokens``), capped by the room left in context.

    Raises :class:`RequestError` when the prompt leaves no room (vLLM's
    ``max_tokens must be at least 1`` once the cap reaches zero).
    """
    check_prompt_length(prompt_tokens, max_model_len)
    asked, _ = _requested_tokens(request)
    if isinstance(request, CompletionRequest) and request.echo and asked == 0:
        return 1
    room = max_model_len - prompt_tokens
    if asked is None:
        asked = default_max_tokens
    budget = room if asked is None else min(room, asked)
    if budget < 1:
        raise invalid_request(f"max_tokens must be at least 1, got {budget}.", "max_tokens", budget)
    if request.min_tokens > budget:
        raise invalid_request(
            f"min_tokens must be less than or equal to max_tokens={budget}, "
            f"got {request.min_tokens}."
        )
    return budget
