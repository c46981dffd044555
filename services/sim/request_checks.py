"""vLLM 0.32's checks of a raw request body, run before pydantic validates its fields.

vLLM writes them as "before" model validators; pydantic runs those last-defined first,
so the tuples below list them in the order they take effect, which decides the error a
body with several faults gets. They raise :class:`~.errors.RequestError` as vLLM raises
``VLLMValidationError``: not a ``ValueError``, so it passes through pydantic unchanged.
Some mutate the body as vLLM's do (defaults for ``tool_choice``, listed ``tool_calls``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .errors import RequestError, invalid_request
from .request_parts import (
    MAX_COMPLETION_PROMPTS,
    LegacyStructuralTagResponseFormat,
    StructuralTagResponseFormat,
)

__all__ = ["CHAT_CHECKS", "COMPLETION_CHECKS", "TOKENIZE_CHAT_CHECKS", "run_checks"]


Check = Callable[[dict[str, Any]], None]

_MAX_CACHE_SALT_LENGTH = 128
_CACHE_SALT_FORBIDDEN = frozenset("@/\\\x00")


def _check_cache_salt(data: dict[str, Any]) -> None:
    salt = data.get("cache_salt")
    if salt is None:
        return
    if not isinstance(salt, str) or not salt:
        raise invalid_request(
            "Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt"
        )
    if len(salt) > _MAX_CACHE_SALT_LENGTH or any(c in _CACHE_SALT_FORBIDDEN for c in salt):
        raise invalid_request(
            "Parameter 'cache_salt' must be at most 128 characters and must not contain "
            "'@', '/', '\\\\', or NUL.",
            "cache_salt",
        )


def _check_stream_options(data: dict[str, Any]) -> None:
    if data.get("stream_options") and not data.get("stream"):
        raise invalid_request(
            "Stream options can only be defined when `stream=True`.", "stream_options"
        )


_STRUCTURAL_TAG = TypeAdapter(StructuralTagResponseFormat | LegacyStructuralTagResponseFormat)


def _check_response_format(data: dict[str, Any]) -> None:
    fmt = data.get("response_format")
    if not isinstance(fmt, dict):
        return
    if fmt.get("type") == "json_schema" and fmt.get("json_schema") is None:
        raise invalid_request(
            "When response_format type is 'json_schema', the 'json_schema' field must be provided.",
            "response_format",
        )
    if fmt.get("type") == "structural_tag":
        # vLLM then compiles the tag with xgrammar; the simulator takes any well-formed one.
        try:
            _STRUCTURAL_TAG.validate_python(fmt)
        except ValidationError:
            raise invalid_request(
                "Invalid response_format structural_tag specification.", "response_format"
            ) from None


def _constraint_count(data: dict[str, Any]) -> int:
    # vLLM reads this off the raw value and fails with a 500 when it is not an
    # object; here a non-object is left for the field's type error.
    outputs = data.get("structured_outputs")
    if not isinstance(outputs, dict):
        return 0
    return sum(outputs.get(k) is not None for k in ("json", "regex", "choice"))


def _check_integer_logprobs(data: dict[str, Any], names: tuple[str, str]) -> None:
    # Compared with numbers below before the fields are validated.
    for name in names:
        value = data.get(name)
        if value is not None and not isinstance(value, int | float):
            raise invalid_request(f"`{name}` must be an integer.", name, value)
    prompt_logprobs = data.get("prompt_logprobs")
    if prompt_logprobs is not None:
        if data.get("stream") and (prompt_logprobs > 0 or prompt_logprobs == -1):
            raise invalid_request(
                "`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs"
            )
        if prompt_logprobs < 0 and prompt_logprobs != -1:
            raise invalid_request(
                "`prompt_logprobs` must be a positive value or -1.",
                "prompt_logprobs",
                prompt_logprobs,
            )


def _check_generation_prompt(data: dict[str, Any]) -> None:
    if data.get("continue_final_message") and data.get("add_generation_prompt"):
        raise invalid_request(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )


def run_checks(checks: tuple[Check, ...], data: Any) -> Any:
    """Apply ``checks`` to a JSON object body (anything else is left to pydantic)."""
    if isinstance(data, dict):
        for check in checks:
            check(data)
    return data


# -- /v1/completions ----------------------------------------------------------------------


def _check_prompt_list_length(data: dict[str, Any]) -> None:
    prompt = data.get("prompt")
    if (
        isinstance(prompt, list)
        and prompt
        and not isinstance(prompt[0], int)  # vLLM looks at the first item only
        and len(prompt) > MAX_COMPLETION_PROMPTS
    ):
        raise invalid_request(
            f"prompt list length {len(prompt)} exceeds the maximum allowed count of "
            f"{MAX_COMPLETION_PROMPTS}. To increase this limit, set the "
            "VLLM_MAX_COMPLETION_PROMPTS environment variable.",
            "prompt",
        )
    embeds = data.get("prompt_embeds")
    if isinstance(embeds, list) and len(embeds) > MAX_COMPLETION_PROMPTS:
        raise invalid_request(
            f"prompt_embeds list length {len(embeds)} exceeds the maximum allowed count of "
            f"{MAX_COMPLETION_PROMPTS}. To increase this limit, set the "
            "VLLM_MAX_COMPLETION_PROMPTS environment variable.",
            "prompt_embeds",
        )


def _check_prompt_given(data: dict[str, Any]) -> None:
    prompt, embeds = data.get("prompt"), data.get("prompt_embeds")
    if (prompt is None or prompt == "") and (embeds is None or embeds == []):
        raise invalid_request(
            "Either prompt or prompt_embeds must be provided and non-empty.", "prompt"
        )


def _check_completion_logprobs(data: dict[str, Any]) -> None:
    token_ids, logprobs = data.get("logprob_token_ids"), data.get("logprobs")
    if token_ids and data.get("use_beam_search"):
        raise invalid_request(
            "`logprob_token_ids` is not supported with beam search.", "logprob_token_ids"
        )
    if data.get("use_beam_search") and data.get("echo") and logprobs is not None:
        raise invalid_request(
            "`echo` with `logprobs` is not supported with beam search because beam search "
            "does not compute prompt logprobs.",
            "echo",
        )
    if token_ids and data.get("echo") and data.get("max_tokens") == 0:
        raise invalid_request(
            "`logprob_token_ids` is not supported when `echo=True` and `max_tokens=0` "
            "because no output tokens are generated.",
            "logprob_token_ids",
        )
    if token_ids and logprobs is None:
        raise invalid_request(
            "when using `logprob_token_ids`, `logprobs` must be set.", "logprob_token_ids"
        )
    _check_integer_logprobs(data, ("prompt_logprobs", "logprobs"))
    if logprobs is not None and logprobs < 0 and logprobs != -1:
        raise invalid_request("`logprobs` must be a positive value or -1.", "logprobs", logprobs)


def _check_completion_constraints(data: dict[str, Any]) -> None:
    if _constraint_count(data) > 1:
        raise invalid_request(
            "You can only use one kind of constraints for structured outputs "
            "('json', 'regex' or 'choice').",
            "structured_outputs",
        )


def _default_null_max_tokens(data: dict[str, Any]) -> None:
    if data.get("max_tokens") is None:  # absent or an explicit null: vLLM's default
        data["max_tokens"] = 16


COMPLETION_CHECKS: tuple[Check, ...] = (
    _check_prompt_list_length,
    _check_prompt_given,
    _check_stream_options,
    _check_completion_logprobs,
    _check_completion_constraints,
    _check_response_format,
    _default_null_max_tokens,
    _check_cache_salt,
)


# -- /v1/chat/completions -----------------------------------------------------------------


def _not_iterable(value: Any) -> RequestError:
    # What vLLM's own loops over a bad value raise (a TypeError it answers with 400).
    return RequestError(400, f"'{type(value).__name__}' object is not iterable")


def _check_messages_iterable(data: dict[str, Any]) -> None:
    messages = data.get("messages", [])
    if not hasattr(messages, "__iter__"):
        raise _not_iterable(messages)


def _normalize_messages(data: dict[str, Any]) -> None:
    """vLLM lists ``tool_calls`` iterables and renames ``reasoning_content`` to ``reasoning``."""
    messages = data.get("messages")
    if not isinstance(messages, list):
        return
    for msg in messages:
        if not isinstance(msg, dict):
            continue
        calls = msg.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            if not hasattr(calls, "__iter__"):
                raise _not_iterable(calls)
            msg["tool_calls"] = list(calls)
        reasoning = msg.pop("reasoning_content", None)
        if reasoning is not None and msg.get("reasoning") is None:
            msg["reasoning"] = reasoning


def _check_tool_usage(data: dict[str, Any]) -> None:
    tools = data.get("tools")
    if tools == []:
        raise invalid_request(
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
        raise invalid_request("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if choice not in ("auto", "required") and not isinstance(choice, dict):
        raise invalid_request(
            f'Invalid value for `tool_choice`: {choice}! Only named tools, "none", "auto" or '
            '"required" are supported.',
            "tool_choice",
        )
    if not isinstance(choice, dict):
        return
    usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
    function = choice.get("function")
    if not isinstance(function, dict):
        raise invalid_request(
            f"Invalid value for `function`: `{function}` in `tool_choice`! {usage}",
            "tool_choice.function",
        )
    if "name" not in function:
        raise invalid_request(
            f"Expected field `name` in `function` in `tool_choice`! {usage}",
            "tool_choice.function.name",
        )
    name = function["name"]
    if not isinstance(name, str) or not name:
        raise invalid_request(
            f"Invalid `name` in `function`: `{name}` in `tool_choice`! {usage}",
            "tool_choice.function.name",
        )
    if not hasattr(tools, "__iter__"):
        raise _not_iterable(tools)
    if not any(_tool_name(tool) == name for tool in tools):
        raise invalid_request(
            "The tool specified in `tool_choice` does not match any of the specified `tools`",
            "tool_choice",
        )


def _tool_name(tool: Any) -> Any:
    """``tool["function"]["name"]`` as vLLM reads it: a TypeError is vLLM's 400; where vLLM
    would fail with a KeyError (a 500), the tool names nothing and its type error follows."""
    try:
        return tool["function"]["name"]
    except (TypeError, IndexError) as exc:
        raise RequestError(400, str(exc)) from None
    except KeyError:
        return None


def _check_chat_constraints(data: dict[str, Any]) -> None:
    count = _constraint_count(data)
    if count > 1:
        raise invalid_request(
            "You can only use one kind of constraints for structured outputs "
            "('json', 'regex' or 'choice')."
        )
    if count > 0 and data.get("tool_choice", "none") not in ("none", "auto", "required"):
        raise invalid_request(
            "You can only either use constraints for structured outputs or tools, not both."
        )


def _check_chat_logprobs(data: dict[str, Any]) -> None:
    if data.get("logprob_token_ids") and data.get("use_beam_search"):
        raise invalid_request(
            "`logprob_token_ids` is not supported with beam search.", "logprob_token_ids"
        )
    if data.get("logprob_token_ids") and not data.get("logprobs"):
        raise invalid_request(
            "when using `logprob_token_ids`, `logprobs` must be set to true.",
            "logprob_token_ids",
        )
    _check_integer_logprobs(data, ("prompt_logprobs", "top_logprobs"))
    top = data.get("top_logprobs")
    if top is not None:
        if top < 0 and top != -1:
            raise invalid_request(
                "`top_logprobs` must be a positive value or -1.", "top_logprobs", top
            )
        if (top == -1 or top > 0) and not data.get("logprobs"):
            raise invalid_request(
                "when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs"
            )


CHAT_CHECKS: tuple[Check, ...] = (
    _check_messages_iterable,
    _check_generation_prompt,
    _check_tool_usage,
    _check_chat_constraints,
    _check_chat_logprobs,
    _check_stream_options,
    _check_response_format,
    _normalize_messages,
    _check_cache_salt,
)
TOKENIZE_CHAT_CHECKS: tuple[Check, ...] = (_check_generation_prompt,)
