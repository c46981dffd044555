"""Chat message normalisation and chat-template rendering, the way vLLM does it.

vLLM (0.32, ``vllm/entrypoints/chat_utils.py`` and ``vllm/renderers/hf.py``):

1. parses each OpenAI message into a "conversation message". For templates of
   the "string" content format (templates that never loop over
   ``message['content']``, like ours) text content parts are joined with
   ``"\\n"``; ``None`` content becomes ``""``. Assistant ``tool_calls`` and
   ``reasoning``, tool ``tool_call_id``, ``name`` and developer ``tools`` are
   carried over; every other key is dropped. Tool-call ``arguments`` given as a
   JSON string are parsed into a dict (``{}`` when not valid JSON), and an empty
   ``tool_calls`` list is removed.
2. calls transformers' ``apply_chat_template``, which renders the template in a
   sandboxed jinja2 environment (``trim_blocks``, ``lstrip_blocks``, the
   ``loopcontrols`` extension and a ``{% generation %}`` tag, a ``tojson`` filter
   that does not escape HTML or non-ASCII, and the ``raise_exception`` and
   ``strftime_now`` globals) with ``messages``, ``tools``, ``documents``,
   ``add_generation_prompt``, the tokenizer's special tokens (``bos_token``, ...)
   and those request ``chat_template_kwargs`` the template actually references.

This module reimplements both steps without importing either project.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox

from .errors import ChatTemplateError

#: Content-part types whose text is taken, and the key holding it.
TEXT_PART_KEYS: dict[str, str] = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}

#: Parameters of transformers' ``apply_chat_template`` that vLLM lets through
#: from ``chat_template_kwargs`` but that are not template variables; they are
#: ignored here (the explicit arguments of :func:`render` cover the useful ones).
_APPLY_PARAMS = frozenset(
    {
        "add_generation_prompt",
        "continue_final_message",
        "documents",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)

#: ``chat_template_kwargs`` keys vLLM rejects (or that collide with arguments).
_FORBIDDEN_KWARGS = frozenset({"chat_template", "tokenize", "tools", "messages", "conversation"})

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


# --------------------------------------------------------------------------- messages


def _part_text(part: Any, index: int, role: str) -> str | None:
    """Text of one content part, or None when the part is skipped."""
    if isinstance(part, str):
        return part
    if not isinstance(part, Mapping):
        raise ChatTemplateError(
            f"content part {index} of a {role!r} message must be an object or a string"
        )
    part_type = part.get("type")
    if part_type is None:
        raise ChatTemplateError(f"content part {index} of a {role!r} message has no 'type'")
    if not isinstance(part_type, str):
        raise ChatTemplateError(f"content part {index} of a {role!r} message has a bad 'type'")
    key = TEXT_PART_KEYS.get(part_type)
    if key is None:
        raise ChatTemplateError(
            f"content part type {part_type!r} is not supported by this text-only model; "
            f"supported types: {', '.join(sorted(TEXT_PART_KEYS))}"
        )
    text = part.get(key)
    if text is None:
        return None
    if not isinstance(text, str):
        raise ChatTemplateError(
            f"content part {index} of a {role!r} message: {key!r} must be a string"
        )
    return text


def flatten_content(content: Any, role: str = "user") -> str:
    """Flatten OpenAI message content to the string a "string" template sees.

    ``None`` gives ``""``; a string is returned as is; a list of content parts
    gives the texts of its text parts joined with ``"\\n"``.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping) or not isinstance(content, Iterable):
        raise ChatTemplateError(f"'content' of a {role!r} message must be a string or a list")
    texts = []
    for index, part in enumerate(content):
        text = _part_text(part, index, role)
        if text is not None:
            texts.append(text)
    return "\n".join(texts)


def _tool_calls(raw: Any, index: int) -> list[dict[str, Any]]:
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Iterable):
        raise ChatTemplateError(f"message {index}: 'tool_calls' must be a list")
    calls = []
    for call in raw:
        if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
            raise ChatTemplateError(
                f"message {index}: each tool call needs a 'function' object"
            )
        call = copy.deepcopy(dict(call))
        call["function"] = dict(call["function"])
        if not isinstance(call["function"].get("name"), str):
            raise ChatTemplateError(f"message {index}: tool call function needs a 'name'")
        arguments = call["function"].get("arguments")
        if isinstance(arguments, str):
            try:
                call["function"]["arguments"] = json.loads(arguments)
            except json.JSONDecodeError:
                call["function"]["arguments"] = {}
        elif not isinstance(arguments, (dict, list)):
            call["function"]["arguments"] = {}
        calls.append(call)
    return calls


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Turn OpenAI chat messages into the conversation vLLM hands to the template."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("'messages' must be a list of message objects")
    if len(messages) == 0:
        raise ChatTemplateError("'messages' must contain at least one message")
    conversation: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {index} must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"message {index} needs a string 'role'")
        content = flatten_content(message.get("content"), role)
        out: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            raw_calls = message.get("tool_calls")
            if raw_calls is not None:
                calls = _tool_calls(raw_calls, index)
                if calls:
                    out["tool_calls"] = calls
            reasoning = message.get("reasoning")
            if reasoning is None:
                reasoning = message.get("reasoning_content")
            if reasoning is not None:
                out["reasoning"] = reasoning
                out["reasoning_content"] = reasoning
        elif role == "tool":
            if "tool_call_id" in message:
                out["tool_call_id"] = message["tool_call_id"]
        if isinstance(message.get("name"), str):
            out["name"] = message["name"]
        if isinstance(message.get("task"), str):
            out["task"] = message["task"]
        if role == "developer":
            out["tools"] = message.get("tools")
        conversation.append(out)
    return conversation


# --------------------------------------------------------------------------- jinja


class GenerationTagExtension(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` and render its body as is.

    transformers uses the tag to build assistant-token masks; rendering is not
    affected, so here the body is simply emitted.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        """Parse the tag into a call block around its body."""
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        node = jinja2.nodes.CallBlock(self.call_method("_emit_body"), [], [], body)
        return node.set_lineno(lineno)

    def _emit_body(self, caller: Any) -> str:
        return caller()


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """``tojson`` as chat templates expect it: plain ``json.dumps``, no HTML escaping."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def make_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """A jinja2 environment configured like transformers' chat-template one."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationTagExtension, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class CompiledChatTemplate:
    """A chat template compiled once, plus the variable names it references."""

    def __init__(self, source: str) -> None:
        env = make_environment()
        try:
            self.template = env.from_string(source)
            self.variables: frozenset[str] = frozenset(
                jinja2.meta.find_undeclared_variables(env.parse(source))
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"invalid chat template: {exc}") from exc
        self.source = source


@lru_cache(maxsize=32)
def compile_template(source: str) -> CompiledChatTemplate:
    """Compile (and cache) a chat template source."""
    return CompiledChatTemplate(source)


def _template_kwargs(
    compiled: CompiledChatTemplate, chat_template_kwargs: Mapping[str, Any] | None
) -> tuple[dict[str, Any], Any]:
    """Split request kwargs into template variables and a ``documents`` fallback."""
    kwargs = dict(chat_template_kwargs or {})
    forbidden = sorted(_FORBIDDEN_KWARGS & kwargs.keys())
    if forbidden:
        raise ChatTemplateError(f"unexpected chat_template_kwargs: {', '.join(forbidden)}")
    documents = kwargs.get("documents")
    variables = {
        key: value
        for key, value in kwargs.items()
        if key in compiled.variables and key not in _APPLY_PARAMS
    }
    return variables, documents


def render(
    compiled: CompiledChatTemplate,
    conversation: list[dict[str, Any]],
    *,
    special_tokens: Mapping[str, str],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """Render an already normalised conversation to prompt text."""
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )
    if tools is not None:
        if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
            raise ChatTemplateError("'tools' must be a list of objects")
        if not all(isinstance(tool, Mapping) for tool in tools):
            raise ChatTemplateError("each tool must be an object (a JSON schema)")
        tools = list(tools)
    variables, kw_documents = _template_kwargs(compiled, chat_template_kwargs)
    if documents is None:
        documents = kw_documents
    if documents is not None and (
        isinstance(documents, (str, bytes, Mapping))
        or not isinstance(documents, Sequence)
        or not all(isinstance(doc, Mapping) for doc in documents)
    ):
        raise ChatTemplateError("'documents' must be a list of objects")

    final_text = ""
    if continue_final_message:
        content = conversation[-1].get("content")
        if not isinstance(content, str):
            raise ChatTemplateError(
                "continue_final_message is set but the final message has no content"
            )
        if "content" not in compiled.source:
            raise ChatTemplateError("continue_final_message is not supported by this chat template")
        final_text = content
        last = {**conversation[-1], "content": final_text + _CONTINUE_TAG}
        conversation = [*conversation[:-1], last]

    context = {**special_tokens, **variables}
    context.update(
        messages=conversation,
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
    )
    try:
        text = compiled.template.render(**context)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template error: {exc}") from exc
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise ChatTemplateError(f"chat template failed to render: {exc}") from exc

    if continue_final_message:
        marker = _CONTINUE_TAG.strip()
        if final_text.strip() not in text or marker not in text:
            raise ChatTemplateError(
                "continue_final_message is set but the chat template dropped the final message"
            )
        cut = text.rindex(marker)
        if text[cut : cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            text = text[:cut]
        else:
            text = text[:cut].rstrip()
    return text
