"""vLLM 0.32's OpenAI-compatible HTTP shapes: request parsing and response encoding.

Requests are parsed into msgspec Structs by :func:`decode_request`, which
applies vLLM's checks in vLLM's order and raises :class:`RequestError` (never
anything else) with the status, ``type`` and ``param`` a vLLM 0.32 server
would answer with. Responses are encoded straight to ``bytes``: msgspec Structs
for the once-per-request bodies, and precomputed byte templates in
:class:`CompletionStream` / :class:`ChatStream` for the per-token SSE events,
which are the hot path. ``docs/vllm-interfaces.md`` describes every shape.

Three classes of request error exist in vLLM 0.32, and each keeps its shape here:

* schema errors (malformed JSON, wrong types, constraint violations, wrong
  content type) come from FastAPI/pydantic: 400, ``"type": "Bad Request"``,
  ``param`` the dotted location such as ``"body.max_tokens"``;
* vLLM's own checks (request validators, sampling parameters, context length):
  400, ``"type": "BadRequestError"``, ``param`` the parameter name or null;
* a body that is not UTF-8 or nests too deeply fails inside FastAPI before
  any of that and is answered ``{"detail": "There was an error parsing the body"}``.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from hashlib import sha256
from typing import Any, Literal, Self, TypeVar, overload

import msgspec

__all__ = [
    "MAX_COMPLETION_PROMPTS",
    "MAX_N_SEQUENCES",
    "MAX_STOP_STRINGS",
    "SSE_DONE",
    "VLLM_VERSION",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatStream",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionStream",
    "DetokenizeRequest",
    "ModelCard",
    "ModelList",
    "RequestError",
    "RequestKind",
    "StreamOptions",
    "TokenizeChatRequest",
    "TokenizeCompletionRequest",
    "chat_completion_response",
    "check_prompt_length",
    "completion_response",
    "decode_request",
    "detokenize_response",
    "error_body",
    "model_card",
    "model_not_found",
    "models_response",
    "queue_full",
    "random_id",
    "response_id",
    "resolve_max_tokens",
    "stream_error_event",
    "system_fingerprint",
    "tokenize_response",
    "version_response",
]

VLLM_VERSION = "0.32.0"
#: ``VLLM_MAX_STOP_STRINGS``: most entries a ``stop`` list may hold.
MAX_STOP_STRINGS = 4
#: ``VLLM_MAX_COMPLETION_PROMPTS``: most prompts one completion request may batch.
MAX_COMPLETION_PROMPTS = 1024
#: ``VLLM_MAX_N_SEQUENCES``: vLLM's upper bound on ``n``.
MAX_N_SEQUENCES = 16384
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_MAX_CACHE_SALT_LENGTH = 128
_CACHE_SALT_FORBIDDEN = frozenset("@/\\\x00")

SSE_DONE = b"data: [DONE]\n\n"

RequestKind = Literal["completion", "chat", "tokenize", "detokenize"]


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class ErrorInfo(msgspec.Struct):
    """The ``error`` object of vLLM's error body."""

    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(msgspec.Struct):
    """vLLM's error body: ``{"error": {message, type, param, code}}``."""

    error: ErrorInfo


class RequestError(Exception):
    """A request vLLM would refuse, carrying the HTTP status and the body fields.

    ``detail_only`` marks FastAPI's own refusals, whose body is
    ``{"detail": message}`` instead of vLLM's error object.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "BadRequestError",
        param: str | None = None,
        *,
        detail_only: bool = False,
    ) -> None:
        """Keep the fields; ``str(error)`` is the message."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.detail_only = detail_only
        #: pydantic-style error entries behind a schema error (empty otherwise)
        self.errors: list[dict[str, Any]] = []

    def body(self) -> bytes:
        """The JSON body vLLM sends with this error."""
        if self.detail_only:
            return _json({"detail": self.message})
        return error_body(self.message, self.type, self.status, self.param)

    def __repr__(self) -> str:
        return f"RequestError({self.status}, {self.message!r}, {self.type!r}, {self.param!r})"


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")
_TRACE_LINE = re.compile(r'\n?\s*File "[^"]+", line \d+, in \S+(\n\s+.*)?')
_SYSTEM_PATH = re.compile(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+")
_FILE_PATH = re.compile(r"(?:/[\w\-]+)+/[\w\-]+\.\w+")


def _sanitize(message: str) -> str:
    """vLLM scrubs object addresses, traceback lines and file paths from every error message."""
    message = _ADDRESS.sub(">", message)
    message = _TRACE_LINE.sub("", message)
    message = _SYSTEM_PATH.sub("<path>", message)
    message = _FILE_PATH.sub("<path>", message)
    return message.strip()


def error_body(message: str, type: str, code: int, param: str | None = None) -> bytes:
    """Encode ``{"error": {"message", "type", "param", "code"}}`` as vLLM 0.32 does."""
    return _json(ErrorResponse(ErrorInfo(_sanitize(message), type, param, code)))


def stream_error_event(message: str, type: str = "InternalServerError", code: int = 500) -> bytes:
    """An SSE event carrying an error in the middle of a stream.

    vLLM writes these with ``json.dumps`` (spaces after ``:`` and ``,``), unlike
    every other body; ``data: [DONE]`` still follows.
    """
    doc = {"error": {"message": _sanitize(message), "type": type, "param": None, "code": code}}
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def model_not_found(model: str, served: Sequence[str]) -> RequestError:
    """404 for a ``model`` that is neither a served name nor a loaded adapter."""
    return RequestError(
        404,
        f"The model `{model}` does not exist. Valid aliases: {', '.join(served)}.",
        "NotFoundError",
        "model",
    )


def queue_full() -> RequestError:
    """503 for a request refused by the waiting-queue limit (vLLM's QueueOverflowError)."""
    return RequestError(
        503,
        "The engine is currently busy and cannot accept new requests. "
        "Please try again later or on a different instance.",
        "Service Unavailable",
    )


def _vllm_error(message: str, param: str | None = None, value: Any = None) -> RequestError:
    """A vLLM validation error: message suffixed with ``(parameter=..., value=...)``."""
    extras = []
    if param is not None:
        extras.append(f"parameter={param}")
    if value is not None:
        extras.append(f"value={_text(value)}")
    text = f"{message} ({', '.join(extras)})" if extras else message
    return RequestError(400, text, "BadRequestError", param)


def _text(value: Any) -> str:
    """``str(value)``, bounded: Python refuses to print ints past 4300 digits."""
    try:
        text = str(value)
    except ValueError:
        return f"<{type(value).__name__}>"
    return text if len(text) <= 200 else text[:200] + "...[truncated]"


def _summarize_input(value: Any) -> str:
    """Render an offending value the way vLLM's validation handler does (bounded)."""
    if isinstance(value, str):
        return value if len(value) <= 200 else value[:200] + "...[truncated]"
    if isinstance(value, list | dict):
        return f"<{type(value).__name__} of {len(value)} items>"
    return _text(value)


def _err(
    kind: str,
    loc: Sequence[str | int],
    msg: str,
    value: Any = None,
    *,
    ctx: dict[str, Any] | None = None,
    show_input: bool = True,
) -> dict[str, Any]:
    """One pydantic error entry, rendered the way vLLM's validation handler prints it."""
    err: dict[str, Any] = {
        "type": kind,
        "loc": ".".join(str(part) for part in ("body", *loc)),
        "msg": msg,
        "input": _summarize_input(value) if show_input else "None",
    }
    if ctx is not None:
        err["ctx"] = ctx
    return err


def _schema_failure(errors: Sequence[dict[str, Any]]) -> RequestError:
    """FastAPI/pydantic validation errors: 400, type "Bad Request", param = first error's loc."""
    label = "error" if len(errors) == 1 else "errors"
    lines = []
    for err in errors[:_MAX_REPORTED_ERRORS]:
        text = str(err)
        lines.append(text if len(text) <= 1000 else text[:1000] + "...[truncated]")
    message = f"{len(errors)} validation {label}:\n" + "".join(f"  {line}\n" for line in lines)
    if len(errors) > _MAX_REPORTED_ERRORS:
        message += f"  ...and {len(errors) - _MAX_REPORTED_ERRORS} more {label}\n"
    failure = RequestError(400, message.rstrip(), "Bad Request", errors[0]["loc"])
    failure.errors = list(errors)
    return failure


def _schema_error(
    kind: str,
    loc: Sequence[str | int],
    msg: str,
    value: Any = None,
    *,
    ctx: dict[str, Any] | None = None,
    show_input: bool = True,
) -> RequestError:
    """A single FastAPI/pydantic validation error."""
    return _schema_failure([_err(kind, loc, msg, value, ctx=ctx, show_input=show_input)])


def _unsupported_media() -> RequestError:
    return RequestError(
        400,
        "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
        "Bad Request",
        None,
    )


_PARSE_FAILURE = "There was an error parsing the body"
_MAX_REPORTED_ERRORS = 10


# --------------------------------------------------------------------------------------
# Request structs
# --------------------------------------------------------------------------------------


class StreamOptions(msgspec.Struct, kw_only=True):
    """``stream_options``; vLLM 0.32 defaults ``include_usage`` to false."""

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class CompletionRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/completions`` body, vLLM 0.32 field names and defaults.

    ``prompt`` is a string, a list of strings, a list of token ids or a list of
    token-id lists (checked by :func:`decode_request`). Unknown fields are ignored.
    """

    model: str | None = None
    prompt: str | list[Any] | None = None
    echo: bool | None = False
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    max_tokens: int | None = 16
    n: int = 1
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = msgspec.field(default_factory=list)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # vLLM sampling extensions
    use_beam_search: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float = 1.0
    stop_token_ids: list[int] | None = msgspec.field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    truncation_side: str | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    bad_words: list[str] = msgspec.field(default_factory=list)
    # vLLM request extensions
    add_special_tokens: bool = True
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    priority: int = 0
    request_id: str | None = None
    session_id: str | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None
    stream_interval: int | None = None


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/chat/completions`` body, vLLM 0.32 field names and defaults.

    ``messages`` items are kept as plain dicts (role, content, name, tool calls...).
    """

    messages: list[dict[str, Any]]
    model: str | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = 1
    presence_penalty: float | None = None
    response_format: dict[str, Any] | None = None
    seed: int | None = None
    stop: str | list[str] | None = msgspec.field(default_factory=list)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = "none"
    reasoning_effort: str | None = None
    thinking_token_budget: int | None = None
    include_reasoning: bool = True
    parallel_tool_calls: bool | None = True
    user: str | None = None
    # vLLM sampling extensions
    use_beam_search: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float = 1.0
    stop_token_ids: list[int] | None = msgspec.field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    truncation_side: str | None = None
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = msgspec.field(default_factory=list)
    # vLLM request extensions
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    priority: int = 0
    request_id: str | None = None
    session_id: str | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    return_prompt_text: bool | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None
    stream_interval: int | None = None


class TokenizeCompletionRequest(msgspec.Struct, kw_only=True):
    """``POST /tokenize`` with a ``prompt``."""

    prompt: str
    model: str | None = None
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(msgspec.Struct, kw_only=True):
    """``POST /tokenize`` with ``messages`` (rendered through the chat template)."""

    messages: list[dict[str, Any]]
    model: str | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool | None = False
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    """``POST /detokenize``."""

    tokens: list[int]
    model: str | None = None


AnyRequest = (
    CompletionRequest
    | ChatCompletionRequest
    | TokenizeCompletionRequest
    | TokenizeChatRequest
    | DetokenizeRequest
)
_R = TypeVar("_R", bound=msgspec.Struct)


# --------------------------------------------------------------------------------------
# decode_request
# --------------------------------------------------------------------------------------


@overload
def decode_request(
    body: bytes,
    kind: Literal["completion"],
    *,
    content_type: str | None = ...,
    max_model_len: int | None = ...,
    max_n: int = ...,
) -> CompletionRequest: ...
@overload
def decode_request(
    body: bytes,
    kind: Literal["chat"],
    *,
    content_type: str | None = ...,
    max_model_len: int | None = ...,
    max_n: int = ...,
) -> ChatCompletionRequest: ...
@overload
def decode_request(
    body: bytes,
    kind: Literal["tokenize"],
    *,
    content_type: str | None = ...,
    max_model_len: int | None = ...,
    max_n: int = ...,
) -> TokenizeCompletionRequest | TokenizeChatRequest: ...
@overload
def decode_request(
    body: bytes,
    kind: Literal["detokenize"],
    *,
    content_type: str | None = ...,
    max_model_len: int | None = ...,
    max_n: int = ...,
) -> DetokenizeRequest: ...
def decode_request(
    body: bytes,
    kind: RequestKind,
    *,
    content_type: str | None = None,
    max_model_len: int | None = None,
    max_n: int = 1,
) -> AnyRequest:
    """Parse and check one request body the way vLLM 0.32 does, in vLLM's order.

    ``kind`` is ``"completion"``, ``"chat"``, ``"tokenize"`` or ``"detokenize"``.
    ``content_type`` is the request's Content-Type header (``""`` when absent);
    ``None`` skips vLLM's application/json check. With ``max_model_len`` the
    output budget is checked against the context length. ``max_n`` caps ``n``
    (vLLM allows :data:`MAX_N_SEQUENCES`; the simulator serves ``n == 1`` by
    default). The model name is not checked here: see :func:`model_not_found`.

    Raises:
        RequestError: for every refused body, whatever the bytes; no other exception.
    """
    checker = _CHECKERS.get(kind)
    if checker is None:
        raise ValueError(f"unknown request kind {kind!r}")
    try:
        return _decode(body, checker, content_type, max_model_len, max_n)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError(400, _PARSE_FAILURE, "Bad Request", detail_only=True) from None
    except Exception as exc:  # never let odd input escape as a 500
        raise RequestError(
            400, f"Invalid request: {type(exc).__name__}", "BadRequestError"
        ) from None


def _decode(
    body: bytes,
    checker: Any,
    content_type: str | None,
    max_model_len: int | None,
    max_n: int,
) -> AnyRequest:
    json_like = True
    if content_type:
        main, _, rest = content_type.partition("/")
        sub = rest.split(";", 1)[0].strip().lower()
        json_like = main.strip().lower() == "application" and (
            sub == "json" or sub.endswith("+json")
        )
    data: Any = None
    has_body = bool(body)
    if has_body and json_like:
        data = _parse_json(body)
    # FastAPI parses the body before vLLM's content-type dependency runs.
    if content_type is not None:
        if content_type.lower().split(";", 1)[0] != "application/json":
            raise _unsupported_media()
    if not has_body:
        raise _schema_error("missing", (), "Field required", show_input=False)
    result: AnyRequest = checker(data, max_model_len, max_n)
    return result


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
        raise _schema_error(
            "json_invalid",
            (exc.pos,),
            "JSON decode error",
            {},
            ctx={"error": exc.msg},
        ) from None
    except Exception:  # not UTF-8, nested too deep, ...
        raise RequestError(400, _PARSE_FAILURE, "Bad Request", detail_only=True) from None
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


# -- schema validation: pydantic's behaviour on top of msgspec -------------------------
#
# msgspec converts the whole body in one fast call. Only when that fails, or a
# field check finds a problem, is the body walked field by field in declaration
# order, so the error list and ``param`` come out as pydantic would report them.

_Errors = list[dict[str, Any]]
_Check = Callable[[Any, tuple[str | int, ...], _Errors], Any]

_TYPE_ERRORS = {
    "int": ("int_type", "Input should be a valid integer"),
    "float": ("float_type", "Input should be a valid number"),
    "bool": ("bool_type", "Input should be a valid boolean"),
    "str": ("string_type", "Input should be a valid string"),
    "array": ("list_type", "Input should be a valid list"),
    "object": ("dict_type", "Input should be a valid dictionary"),
}
_EXPECTED = re.compile(r"Expected `([^`]*)`, got `([^`]*)`")
_MISSING = re.compile(r"Object missing required field `([^`]*)`")
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_NESTED_MODELS = {"stream_options"}


def _json_type(value: Any) -> str:
    """msgspec's name for a value's JSON type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "array"
    return "object"


def _translate(text: str, value: Any, base: tuple[str | int, ...]) -> dict[str, Any]:
    """Turn a msgspec ValidationError message about ``value`` (found at ``base``) into
    the pydantic error entry vLLM would print."""
    message, _, where = text.partition(" - at `")
    expected_match = _EXPECTED.match(message)
    got = expected_match.group(2) if expected_match else ""
    loc: list[str | int] = list(base)
    for name, index in _PATH_PART.findall(where.rstrip("`")):
        if name:
            loc.append(name)
            value = value.get(name) if isinstance(value, dict) else None
        elif index == "...":
            # a dict value; msgspec does not say which key, so find the culprit
            if isinstance(value, dict):
                key = next((k for k, v in value.items() if _json_type(v) == got), None)
                if key is None:
                    key = next(iter(value), None)
                if key is not None:
                    loc.append(key)
                    value = value[key]
        else:
            i = int(index)
            loc.append(i)
            value = value[i] if isinstance(value, list) and i < len(value) else None
    if m := _MISSING.match(message):
        return _err("missing", (*loc, m.group(1)), "Field required", value)
    if expected_match is None:
        return _err("value_error", loc, message, value)
    expected = [t.strip() for t in expected_match.group(1).split("|") if t.strip() != "null"]
    want = expected[0] if expected else "object"
    if want == "int":
        if isinstance(value, float) and not math.isfinite(value):
            return _err("finite_number", loc, "Input should be a finite number", value)
        if got == "float":
            return _err(
                "int_from_float",
                loc,
                "Input should be a valid integer, got a number with a fractional part",
                value,
            )
        if got == "str":
            return _err(
                "int_parsing",
                loc,
                "Input should be a valid integer, unable to parse string as an integer",
                value,
            )
    elif want == "float" and got == "str":
        return _err(
            "float_parsing",
            loc,
            "Input should be a valid number, unable to parse string as a number",
            value,
        )
    elif want == "bool" and got in ("str", "int", "float"):
        return _err(
            "bool_parsing", loc, "Input should be a valid boolean, unable to interpret input", value
        )
    elif want == "object" and len(loc) == 1 and loc[0] in _NESTED_MODELS:
        return _err(
            "model_attributes_type",
            loc,
            "Input should be a valid dictionary or object to extract fields from",
            value,
        )
    kind, msg = _TYPE_ERRORS.get(want, ("value_error", message))
    return _err(kind, loc, msg, value)


_BOOL_WORDS = {
    "0": False, "off": False, "f": False, "false": False, "n": False, "no": False,
    "1": True, "on": True, "t": True, "true": True, "y": True, "yes": True,
}  # fmt: skip
_LAX_FIELDS: dict[type, tuple[frozenset[str], frozenset[str]]] = {}


def _lax_fields(cls: type) -> tuple[frozenset[str], frozenset[str]]:
    """Names of ``cls``'s bool fields and of its int/float fields (cached)."""
    if cls not in _LAX_FIELDS:
        bools, numbers = set(), set()
        for field in msgspec.structs.fields(cls):
            args = set(getattr(field.type, "__args__", ())) or {field.type}
            args.discard(type(None))
            if args == {bool}:
                bools.add(field.name)
            elif args in ({int}, {float}):
                numbers.add(field.name)
        _LAX_FIELDS[cls] = (frozenset(bools), frozenset(numbers))
    return _LAX_FIELDS[cls]


def _coerce_lax(data: dict[str, Any], cls: type) -> dict[str, Any]:
    """Apply the lax coercions pydantic makes and msgspec does not: "yes"/"on"/"off"...
    for booleans, and booleans for numbers."""
    bools, numbers = _lax_fields(cls)
    fixed: dict[str, Any] | None = None
    for name in bools.intersection(data):
        value = data[name]
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            fixed = fixed if fixed is not None else dict(data)
            fixed[name] = _BOOL_WORDS[value.strip().lower()]
    for name in numbers.intersection(data):
        if isinstance(data[name], bool):
            fixed = fixed if fixed is not None else dict(data)
            fixed[name] = int(data[name])
    options = data.get("stream_options")
    if isinstance(options, dict):
        coerced = _coerce_lax(options, StreamOptions)
        if coerced is not options:
            fixed = fixed if fixed is not None else dict(data)
            fixed["stream_options"] = coerced
    return data if fixed is None else fixed


def _validate(
    data: Any,
    cls: type[_R],
    raw_checks: dict[str, _Check],
    checks: dict[str, _Check],
) -> _R:
    """Convert ``data`` into ``cls`` with pydantic's error reporting.

    ``raw_checks`` validate a field's JSON value themselves (unions msgspec cannot
    express); ``checks`` refine a field after conversion (ranges, literals). Both
    return the field's final value and append error entries on failure.
    """
    if not isinstance(data, dict):
        raise _schema_error(
            "model_attributes_type",
            (),
            "Input should be a valid dictionary or object to extract fields from",
            data,
        )
    data = _coerce_lax(data, cls)
    errors: _Errors = []
    try:
        req = msgspec.convert(data, cls, strict=False)
    except msgspec.ValidationError as exc:
        first = str(exc)
    else:
        for name, check in (*raw_checks.items(), *checks.items()):
            if name in data:
                value = check(getattr(req, name), (name,), errors)
                setattr(req, name, value)
        if not errors:
            return req
        order = {f.name: i for i, f in enumerate(msgspec.structs.fields(cls))}
        errors.sort(key=lambda e: order.get(e["loc"].split(".")[1], len(order)))
        raise _schema_failure(errors)
    for field in msgspec.structs.fields(cls):
        name = field.name
        if name not in data:
            if field.required:
                errors.append(_err("missing", (name,), "Field required", data))
            continue
        raw = data[name]
        if name in raw_checks:
            raw_checks[name](raw, (name,), errors)
            continue
        try:
            value = msgspec.convert(raw, field.type, strict=False)
        except msgspec.ValidationError as exc:
            errors.append(_translate(str(exc), raw, (name,)))
            continue
        if name in checks:
            checks[name](value, (name,), errors)
    if not errors:  # the whole-body conversion failed in a way no single field shows
        errors.append(_translate(first, data, ()))
    raise _schema_failure(errors)


def _ranged(lo: int | None, hi: int | None) -> _Check:
    """A pydantic ``ge``/``le`` constraint on an optional int field."""

    def check(value: Any, loc: tuple[str | int, ...], errors: _Errors) -> Any:
        if value is None:
            return value
        if lo is not None and value < lo:
            errors.append(
                _err(
                    "greater_than_equal",
                    loc,
                    f"Input should be greater than or equal to {lo}",
                    value,
                    ctx={"ge": lo},
                )
            )
        elif hi is not None and value > hi:
            errors.append(
                _err(
                    "less_than_equal",
                    loc,
                    f"Input should be less than or equal to {hi}",
                    value,
                    ctx={"le": hi},
                )
            )
        return value

    return check


def _literal(*allowed: str) -> _Check:
    """A pydantic ``Literal[...]`` on an optional string field."""
    quoted = [f"'{a}'" for a in allowed]
    expected = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]

    def check(value: Any, loc: tuple[str | int, ...], errors: _Errors) -> Any:
        if value is not None and value not in allowed:
            errors.append(
                _err(
                    "literal_error",
                    loc,
                    f"Input should be {expected}",
                    value,
                    ctx={"expected": expected},
                )
            )
        return value

    return check


_INT_TEXT = re.compile(r"\s*[+-]?\d+\s*")


def _lax_int(value: Any, loc: tuple[str | int, ...]) -> tuple[int | None, dict[str, Any] | None]:
    """pydantic's lax ``int`` for one value: the int, or the error entry."""
    if isinstance(value, int):  # bool included: lax mode takes True as 1
        return int(value), None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None, _err("finite_number", loc, "Input should be a finite number", value)
        if value != int(value):
            return None, _err(
                "int_from_float",
                loc,
                "Input should be a valid integer, got a number with a fractional part",
                value,
            )
        return int(value), None
    if isinstance(value, str):
        if _INT_TEXT.fullmatch(value):
            return int(value), None
        return None, _err(
            "int_parsing",
            loc,
            "Input should be a valid integer, unable to parse string as an integer",
            value,
        )
    return None, _err("int_type", loc, "Input should be a valid integer", value)


def _token_list(value: Any, loc: tuple[str | int, ...], errors: _Errors) -> list[int] | None:
    """Validate ``list[int >= 0]``; append errors and return None on failure."""
    if not isinstance(value, list):
        errors.append(_err("list_type", loc, "Input should be a valid list", value))
        return None
    out: list[int] = []
    failed = False
    for i, item in enumerate(value):
        number, error = _lax_int(item, (*loc, i))
        if error is None and number is not None and number < 0:
            error = _err(
                "greater_than_equal",
                (*loc, i),
                "Input should be greater than or equal to 0",
                item,
                ctx={"ge": 0},
            )
        if error is not None:
            errors.append(error)
            failed = True
        elif number is not None:
            out.append(number)
    return None if failed else out


def _str_list(value: Any, loc: tuple[str | int, ...], errors: _Errors) -> list[str] | None:
    """Validate ``list[str]`` (pydantic does not coerce other types to str)."""
    if not isinstance(value, list):
        errors.append(_err("list_type", loc, "Input should be a valid list", value))
        return None
    bad = [
        _err("string_type", (*loc, i), "Input should be a valid string", item)
        for i, item in enumerate(value)
        if not isinstance(item, str)
    ]
    errors.extend(bad)
    return None if bad else value


def _is_token_ids(value: list[Any]) -> bool:
    return all(type(v) is int and v >= 0 for v in value)


def _check_prompt(value: Any, loc: tuple[str | int, ...], errors: _Errors) -> Any:
    """``prompt`` as pydantic's smart union of list[int>=0], list[list[int>=0]], str and
    list[str]: an exact match first, then lax coercion in member order; when every
    member fails, each member's errors are reported, in member order."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and (
        _is_token_ids(value)
        or all(isinstance(p, str) for p in value)
        or all(isinstance(p, list) and _is_token_ids(p) for p in value)
    ):
        return value
    mine: _Errors = []
    tokens = _token_list(value, loc, mine)
    if tokens is not None:
        return tokens
    if isinstance(value, list):
        before = len(mine)
        nested = [_token_list(item, (*loc, i), mine) for i, item in enumerate(value)]
        if len(mine) == before:
            return nested
    else:
        mine.append(_err("list_type", loc, "Input should be a valid list", value))
    mine.append(_err("string_type", loc, "Input should be a valid string", value))
    _str_list(value, loc, mine)
    errors.extend(mine)
    return value


def _check_stop(value: Any, loc: tuple[str | int, ...], errors: _Errors) -> Any:
    """``stop``: str | list[str] of at most :data:`MAX_STOP_STRINGS` entries | None."""
    if value is None or isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and len(value) <= MAX_STOP_STRINGS
        and all(isinstance(s, str) for s in value)
    ):
        return value
    errors.append(_err("string_type", loc, "Input should be a valid string", value))
    if _str_list(value, loc, errors) is not None and len(value) > MAX_STOP_STRINGS:
        errors.append(
            _err(
                "too_long",
                loc,
                f"List should have at most {MAX_STOP_STRINGS} items after validation, "
                f"not {len(value)}",
                value,
                ctx={
                    "field_type": "List",
                    "max_length": MAX_STOP_STRINGS,
                    "actual_length": len(value),
                },
            )
        )
    return value


# vLLM types a message as a union of these TypedDicts plus the harmony ``Message`` model;
# pydantic reports a bad message once per member, prefixing each location with its name.
_MESSAGE_MEMBERS = (
    "ChatCompletionDeveloperMessageParam",
    "ChatCompletionSystemMessageParam",
    "ChatCompletionUserMessageParam",
    "ChatCompletionAssistantMessageParam",
    "ChatCompletionToolMessageParam",
    "ChatCompletionFunctionMessageParam",
    "CustomChatCompletionMessageParam",
)


def _check_messages(value: Any, loc: tuple[str | int, ...], errors: _Errors) -> Any:
    """``messages``: a list of objects with a string ``role`` and string/list/null ``content``.

    A non-object message gets pydantic's full per-member error list; other faults
    are reported once, at the first union member's location (vLLM's ``param``).
    """
    if not isinstance(value, list):
        errors.append(_err("list_type", loc, "Input should be a valid list", value))
        return value
    first = _MESSAGE_MEMBERS[0]
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            errors.extend(
                _err("dict_type", (*loc, i, member), "Input should be a valid dictionary", msg)
                for member in _MESSAGE_MEMBERS
            )
            errors.append(
                _err(
                    "model_attributes_type",
                    (*loc, i, "Message"),
                    "Input should be a valid dictionary or object to extract fields from",
                    msg,
                )
            )
            continue
        role = msg.get("role")
        if role is None:
            errors.append(_err("missing", (*loc, i, first, "role"), "Field required", msg))
        elif not isinstance(role, str):
            errors.append(
                _err(
                    "string_type", (*loc, i, first, "role"), "Input should be a valid string", role
                )
            )
        content = msg.get("content")
        if content is not None and not isinstance(content, str | list):
            errors.append(
                _err(
                    "string_type",
                    (*loc, i, first, "content"),
                    "Input should be a valid string",
                    content,
                )
            )
        elif isinstance(content, list):
            errors.extend(
                _err(
                    "dict_type",
                    (*loc, i, first, "content", j),
                    "Input should be a valid dictionary",
                    part,
                )
                for j, part in enumerate(content)
                if not isinstance(part, dict | str)
            )
    return value


def _check_tools(value: Any, loc: tuple[str | int, ...], errors: _Errors) -> Any:
    """Each tool needs ``function`` with a string ``name``."""
    for i, tool in enumerate(value or ()):
        function = tool.get("function")
        if function is None:
            errors.append(_err("missing", (*loc, i, "function"), "Field required", tool))
        elif not isinstance(function, dict):
            errors.append(
                _err(
                    "model_attributes_type",
                    (*loc, i, "function"),
                    "Input should be a valid dictionary or object to extract fields from",
                    function,
                )
            )
        elif "name" not in function:
            errors.append(
                _err("missing", (*loc, i, "function", "name"), "Field required", function)
            )
        elif not isinstance(function["name"], str):
            errors.append(
                _err(
                    "string_type",
                    (*loc, i, "function", "name"),
                    "Input should be a valid string",
                    function["name"],
                )
            )
    return value


def _check_token_ids(value: Any, loc: tuple[str | int, ...], errors: _Errors) -> Any:
    """``list[int]`` with ``0 <= id <= 2**63 - 1`` (detokenize)."""
    for i, token in enumerate(value):
        _ranged(0, _INT64_MAX)(token, (*loc, i), errors)
    return value


_COMMON_CHECKS: dict[str, _Check] = {
    "seed": _ranged(_INT64_MIN, _INT64_MAX),
    "truncate_prompt_tokens": _ranged(-1, _INT64_MAX),
    "truncation_side": _literal("left", "right"),
    "priority": _ranged(_INT64_MIN, _INT64_MAX),
    "stream_interval": _ranged(1, None),
}
_COMPLETION_RAW: dict[str, _Check] = {"prompt": _check_prompt, "stop": _check_stop}
_CHAT_RAW: dict[str, _Check] = {"messages": _check_messages, "stop": _check_stop}
_CHAT_CHECKS: dict[str, _Check] = {
    "tools": _check_tools,
    "tool_choice": lambda v, loc, errors: (
        _literal("none", "auto", "required")(v, loc, errors) if isinstance(v, str) else v
    ),
    "reasoning_effort": _literal("none", "minimal", "low", "medium", "high", "xhigh", "max"),
    **_COMMON_CHECKS,
}
_TOKENIZE_CHAT_RAW: dict[str, _Check] = {"messages": _check_messages}
_TOKENIZE_CHAT_CHECKS: dict[str, _Check] = {"tools": _check_tools}


# -- vLLM's "before" validators, run on the raw dict in vLLM's order -------------------


def _validate_cache_salt(data: dict[str, Any]) -> None:
    salt = data.get("cache_salt")
    if salt is None:
        return
    if not isinstance(salt, str) or not salt:
        raise _vllm_error(
            "Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt"
        )
    if len(salt) > _MAX_CACHE_SALT_LENGTH or any(c in _CACHE_SALT_FORBIDDEN for c in salt):
        raise _vllm_error(
            "Parameter 'cache_salt' must be at most 128 characters and must not contain "
            "'@', '/', '\\\\', or NUL.",
            "cache_salt",
        )


def _validate_stream_options(data: dict[str, Any]) -> None:
    if data.get("stream_options") and not data.get("stream"):
        raise _vllm_error(
            "Stream options can only be defined when `stream=True`.", "stream_options"
        )


def _validate_logprob_fields(data: dict[str, Any], names: tuple[str, str]) -> None:
    """The numeric part of vLLM's ``check_logprobs`` (it runs before field validation)."""
    for name in names:
        value = data.get(name)
        if value is not None and not isinstance(value, int | float):
            raise _vllm_error(f"`{name}` must be an integer.", name, value)
    prompt_logprobs = data.get("prompt_logprobs")
    if prompt_logprobs is not None:
        if data.get("stream") and (prompt_logprobs > 0 or prompt_logprobs == -1):
            raise _vllm_error(
                "`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs"
            )
        if prompt_logprobs < 0 and prompt_logprobs != -1:
            raise _vllm_error(
                "`prompt_logprobs` must be a positive value or -1.",
                "prompt_logprobs",
                prompt_logprobs,
            )


def _before_completion(data: dict[str, Any]) -> None:
    prompt = data.get("prompt")
    if (
        isinstance(prompt, list)
        and prompt
        and not isinstance(prompt[0], int)
        and len(prompt) > MAX_COMPLETION_PROMPTS
    ):
        raise _vllm_error(
            f"prompt list length {len(prompt)} exceeds the maximum allowed count of "
            f"{MAX_COMPLETION_PROMPTS}. To increase this limit, set the "
            "VLLM_MAX_COMPLETION_PROMPTS environment variable.",
            "prompt",
        )
    if prompt is None or prompt == "":
        raise _vllm_error(
            "Either prompt or prompt_embeds must be provided and non-empty.", "prompt"
        )
    _validate_stream_options(data)
    _validate_logprob_fields(data, ("prompt_logprobs", "logprobs"))
    logprobs = data.get("logprobs")
    if logprobs is not None and logprobs < 0 and logprobs != -1:
        raise _vllm_error("`logprobs` must be a positive value or -1.", "logprobs", logprobs)
    _validate_cache_salt(data)


def _before_chat(data: dict[str, Any]) -> None:
    if data.get("continue_final_message") and data.get("add_generation_prompt"):
        raise _vllm_error(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )
    _check_tool_usage(data)
    _validate_logprob_fields(data, ("prompt_logprobs", "top_logprobs"))
    top_logprobs = data.get("top_logprobs")
    if top_logprobs is not None:
        if top_logprobs < 0 and top_logprobs != -1:
            raise _vllm_error(
                "`top_logprobs` must be a positive value or -1.", "top_logprobs", top_logprobs
            )
        if (top_logprobs == -1 or top_logprobs > 0) and not data.get("logprobs"):
            raise _vllm_error(
                "when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs"
            )
    _validate_stream_options(data)
    _validate_cache_salt(data)


def _check_tool_usage(data: dict[str, Any]) -> None:
    tools = data.get("tools")
    if tools == []:
        raise _vllm_error(
            "`tools` must not be an empty array. Either provide at least one tool or omit the "
            "field entirely.",
            "tools",
        )
    if "tool_choice" not in data and tools:
        data["tool_choice"] = "auto"
    choice = data.get("tool_choice")
    if choice is None or choice == "none":
        return
    if tools is None:
        raise _vllm_error("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if choice not in ("auto", "required") and not isinstance(choice, dict):
        raise _vllm_error(
            f'Invalid value for `tool_choice`: {_text(choice)}! Only named tools, "none", '
            '"auto" or "required" are supported.',
            "tool_choice",
        )
    if not isinstance(choice, dict):
        return
    usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
    function = choice.get("function")
    if not isinstance(function, dict):
        raise _vllm_error(
            f"Invalid value for `function`: `{_text(function)}` in `tool_choice`! {usage}",
            "tool_choice.function",
        )
    if "name" not in function:
        raise _vllm_error(
            f"Expected field `name` in `function` in `tool_choice`! {usage}",
            "tool_choice.function.name",
        )
    name = function["name"]
    if not isinstance(name, str) or not name:
        raise _vllm_error(
            f"Invalid `name` in `function`: `{_text(name)}` in `tool_choice`! {usage}",
            "tool_choice.function.name",
        )
    declared = [
        t["function"].get("name")
        for t in (tools if isinstance(tools, list) else ())
        if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    if name not in declared:
        raise _vllm_error(
            "The tool specified in `tool_choice` does not match any of the specified `tools`",
            "tool_choice",
        )


# -- vLLM's serving-time checks (sampling parameters, context budget) ------------------


def _check_budget(requested: int | None, param: str, max_model_len: int | None) -> None:
    if requested is not None and max_model_len is not None and requested > max_model_len:
        raise _vllm_error(
            f"{param}={requested} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.",
            param,
            requested,
        )


def _check_sampling(
    req: CompletionRequest | ChatCompletionRequest,
    max_tokens: int | None,
    max_n: int,
) -> None:
    """vLLM's SamplingParams checks on the values the client sent, in vLLM's order."""
    n = 1 if req.n is None else req.n
    if n < 1:
        raise _vllm_error(f"n must be at least 1, got {n}.")
    if n > max_n:
        hint = (
            " To increase this limit, set the VLLM_MAX_N_SEQUENCES environment variable."
            if max_n == MAX_N_SEQUENCES
            else ""
        )
        raise _vllm_error(f"n must be at most {max_n}, got {n}.{hint}")
    if req.presence_penalty is not None and not -2.0 <= req.presence_penalty <= 2.0:
        raise _vllm_error(f"presence_penalty must be in [-2, 2], got {req.presence_penalty}.")
    if req.frequency_penalty is not None and not -2.0 <= req.frequency_penalty <= 2.0:
        raise _vllm_error(f"frequency_penalty must be in [-2, 2], got {req.frequency_penalty}.")
    rep = req.repetition_penalty
    if rep is not None and not math.isfinite(rep):
        raise _vllm_error(f"repetition_penalty must be a finite number, got {rep}.")
    if rep is not None and rep <= 0.0:
        raise _vllm_error(f"repetition_penalty must be greater than zero, got {rep}.")
    temp = req.temperature
    if temp is not None:
        if not math.isfinite(temp):
            raise _vllm_error(
                f"temperature must be a finite number, got {temp}.", "temperature", temp
            )
        if temp < 0.0:
            raise _vllm_error(f"temperature must be non-negative, got {temp}.", "temperature", temp)
        if temp > 2.0:
            raise _vllm_error(f"temperature must be in [0, 2], got {temp}.", "temperature", temp)
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise _vllm_error(f"top_p must be in (0, 1], got {req.top_p}.", "top_p", req.top_p)
    if req.top_k is not None and req.top_k < -1:
        raise _vllm_error(f"top_k must be 0 (disable), or at least 1, got {req.top_k}.")
    if req.min_p is not None and not 0.0 <= req.min_p <= 1.0:
        raise _vllm_error(f"min_p must be in [0, 1], got {req.min_p}.")
    if max_tokens is not None and max_tokens < 1:
        raise _vllm_error(
            f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens
        )
    if req.min_tokens < 0:
        raise _vllm_error(f"min_tokens must be greater than or equal to 0, got {req.min_tokens}.")
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise _vllm_error(
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
            f"got {req.min_tokens}."
        )
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if any(not s for s in stop):
        raise _vllm_error("stop cannot contain an empty string.")
    if any(not w for w in req.bad_words):
        raise _vllm_error(
            f"bad_words cannot contain an empty string. Got bad_words={req.bad_words}"
        )


# -- one function per request kind ------------------------------------------------------


def _completion(data: Any, max_model_len: int | None, max_n: int) -> CompletionRequest:
    if isinstance(data, dict):
        if data.get("max_tokens") is None:  # vLLM turns an explicit null into the default
            data = {**data, "max_tokens": 16}
        _before_completion(data)
    req = _validate(data, CompletionRequest, _COMPLETION_RAW, _COMMON_CHECKS)
    _check_budget(req.max_tokens, "max_tokens", max_model_len)
    # echo with max_tokens == 0 returns the prompt only; vLLM then samples one token.
    budget = 1 if req.echo and req.max_tokens == 0 else req.max_tokens
    _check_sampling(req, budget, max_n)
    return req


def _chat(data: Any, max_model_len: int | None, max_n: int) -> ChatCompletionRequest:
    if isinstance(data, dict):
        _before_chat(data)
        if "top_logprobs" in data and data["top_logprobs"] is None:
            data = {**data, "top_logprobs": 0}
    req = _validate(data, ChatCompletionRequest, _CHAT_RAW, _CHAT_CHECKS)
    if req.max_completion_tokens is not None:
        _check_budget(req.max_completion_tokens, "max_completion_tokens", max_model_len)
        budget: int | None = req.max_completion_tokens
    else:
        _check_budget(req.max_tokens, "max_tokens", max_model_len)
        budget = req.max_tokens
    _check_sampling(req, budget, max_n)
    return req


def _tokenize(
    data: Any, max_model_len: int | None, max_n: int
) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """vLLM validates ``TokenizeCompletionRequest | TokenizeChatRequest``; when both
    fail, the completion variant's errors come first."""
    if not isinstance(data, dict):
        return _validate(data, TokenizeCompletionRequest, {}, {})
    if data.get("continue_final_message") and data.get("add_generation_prompt"):
        raise _vllm_error(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )
    failures: list[RequestError] = []
    for cls, raw, checks in (
        (TokenizeCompletionRequest, {}, {}),
        (TokenizeChatRequest, _TOKENIZE_CHAT_RAW, _TOKENIZE_CHAT_CHECKS),
    ):
        try:
            return _validate(data, cls, raw, checks)  # type: ignore[arg-type,return-value]
        except RequestError as exc:
            failures.append(exc)
    errors = [e for exc in failures for e in exc.errors]
    raise _schema_failure(errors)


def _detokenize(data: Any, max_model_len: int | None, max_n: int) -> DetokenizeRequest:
    return _validate(data, DetokenizeRequest, {}, {"tokens": _check_token_ids})


_CHECKERS: dict[str, Callable[[Any, int | None, int], AnyRequest]] = {
    "completion": _completion,
    "chat": _chat,
    "tokenize": _tokenize,
    "detokenize": _detokenize,
}


def check_prompt_length(prompt_tokens: int, max_model_len: int) -> None:
    """Refuse a prompt longer than the context, with vLLM's message (400, ``input_tokens``)."""
    if prompt_tokens > max_model_len:
        raise _vllm_error(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt contains {prompt_tokens} input tokens, which exceeds this limit even "
            "without any output tokens. Please reduce the length of the input prompt.",
            "input_tokens",
            prompt_tokens,
        )


def resolve_max_tokens(
    request: CompletionRequest | ChatCompletionRequest, prompt_tokens: int, max_model_len: int
) -> int:
    """The output budget vLLM grants: the request's limit, capped by the room left in context.

    Raises :class:`RequestError` when the prompt leaves no room (vLLM's
    ``max_tokens must be at least 1`` once the cap reaches zero).
    """
    check_prompt_length(prompt_tokens, max_model_len)
    if isinstance(request, ChatCompletionRequest):
        asked = (
            request.max_completion_tokens
            if request.max_completion_tokens is not None
            else request.max_tokens
        )
    else:
        asked = request.max_tokens
        if request.echo and asked == 0:
            return 1
    room = max_model_len - prompt_tokens
    budget = room if asked is None else min(room, asked)
    if budget < 1:
        raise _vllm_error(f"max_tokens must be at least 1, got {budget}.", "max_tokens", budget)
    if request.min_tokens > budget:
        raise _vllm_error(
            f"min_tokens must be less than or equal to max_tokens={budget}, "
            f"got {request.min_tokens}."
        )
    return budget


# --------------------------------------------------------------------------------------
# Identifiers
# --------------------------------------------------------------------------------------


def random_id() -> str:
    """vLLM 0.32's ``random_uuid()``: 64 random bits as 16 hex digits."""
    return f"{random.getrandbits(64):016x}"


def response_id(
    kind: Literal["completion", "chat"],
    request: CompletionRequest | ChatCompletionRequest,
    x_request_id: str | None = None,
) -> str:
    """``cmpl-``/``chatcmpl-`` + X-Request-Id, else the body's ``request_id``, else random hex."""
    base = x_request_id if x_request_id is not None else (request.request_id or random_id())
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + base


def system_fingerprint(model_name: str, salt: str = "") -> str:
    """A stable ``vllm-0.32.0-<8 hex>`` fingerprint, the shape of vLLM's default mode."""
    digest = sha256(f"{model_name}\x00{salt}".encode(errors="replace")).hexdigest()
    return f"vllm-{VLLM_VERSION}-{digest[:8]}"


# --------------------------------------------------------------------------------------
# Encoding helpers
# --------------------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()


def _json(value: Any) -> bytes:
    """msgspec JSON; strings with lone surrogates fall back to escaped ASCII."""
    try:
        return _encoder.encode(value)
    except UnicodeEncodeError:
        return json.dumps(msgspec.to_builtins(value), separators=(",", ":")).encode()


_NULL = b"null"


# --------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------


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
                _json(request_id),
                b',"object":"',
                self._object.encode(),
                b'","created":',
                str(self.created).encode(),
                b',"model":',
                _json(model),
                b',"choices":[',
            )
        )
        # A fingerprint rides on the terminal chunk only when no usage chunk follows.
        self._fp_tail = (
            b',"system_fingerprint":' + _json(system_fingerprint) + b"}\n\n"
            if system_fingerprint is not None and not include_usage
            else b"}\n\n"
        )

    @classmethod
    def for_request(
        cls,
        request: CompletionRequest | ChatCompletionRequest,
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
        return b"data: " + _json(chunk) + b"\n\n"

    @staticmethod
    def done() -> bytes:
        """The closing ``data: [DONE]`` event."""
        return SSE_DONE


def _ids(token_ids: Sequence[int] | None) -> bytes:
    return _NULL if token_ids is None else _encoder.encode(list(token_ids))


def _reason(value: int | str | None) -> bytes:
    return _NULL if value is None else _json(value)


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
            _json(text),
            b',"logprobs":null,"finish_reason":',
            _NULL if finish_reason is None else _json(finish_reason),
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
            _json(role),
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
            _json(content),
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
            _json(text),
            b'},"logprobs":null,"finish_reason":',
        ]
        if finish_reason is None:
            parts.append(b"null")
        else:
            parts += (_json(finish_reason), b',"stop_reason":', _reason(stop_reason))
        parts += (b',"token_ids":', _ids(token_ids), b"}]")
        if self.continuous_usage:
            parts.append(self._chat_usage())
        parts.append(self._fp_tail if finish_reason is not None else b"}\n\n")
        return b"".join(parts)


# --------------------------------------------------------------------------------------
# Whole responses
# --------------------------------------------------------------------------------------


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
    return _json(response)


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
    return _json(
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


# --------------------------------------------------------------------------------------
# Models, tokenizer endpoints, version
# --------------------------------------------------------------------------------------


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
    return _json(ModelList(object="list", data=list(cards)))


class _TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


def tokenize_response(
    tokens: Sequence[int], max_model_len: int, token_strs: Sequence[str] | None = None
) -> bytes:
    """``POST /tokenize`` reply: count, max_model_len, tokens, token_strs (null unless asked)."""
    return _json(
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
    return _json(_DetokenizeResponse(text))


def version_response() -> bytes:
    """``GET /version`` reply."""
    return b'{"version":"' + VLLM_VERSION.encode() + b'"}'
