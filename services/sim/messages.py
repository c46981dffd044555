"""Chat message shapes as vLLM 0.32 validates them: OpenAI's message TypedDicts, vLLM's
custom message and content parts, and the harmony ``Message``.

vLLM types ``messages`` as a union of these; pydantic tries each member and, when all fail,
reports every member's errors under the member's class name (``messages.0.
ChatCompletionUserMessageParam.role``). The class names, field order and ``Required``
markers are therefore part of the wire contract and follow the ``openai`` package vLLM
0.32 ships with. As there, list content is typed ``Iterable``: pydantic checks its parts
lazily, when the prompt is rendered (see :func:`materialize`), not while the body is
validated.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, Required, TypeAlias

from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import TypedDict

from .errors import RequestError

__all__ = ["ChatCompletionMessageParam", "FunctionDefinitionParam", "materialize"]


class FunctionDefinitionParam(TypedDict, total=False):
    """OpenAI's ``FunctionDefinition`` (a tool's function)."""

    name: Required[str]
    description: str
    parameters: dict[str, object]
    strict: bool | None


# -- content parts ----------------------------------------------------------------------


class PromptCacheBreakpoint(TypedDict, total=False):
    """An explicit prompt-cache breakpoint on a content part."""

    mode: Required[Literal["explicit"]]
    ttl: Literal["30m", "12h"]


class ChatCompletionContentPartTextParam(TypedDict, total=False):
    """A text part."""

    text: Required[str]
    type: Required[Literal["text"]]
    prompt_cache_breakpoint: PromptCacheBreakpoint


class ImageURL(TypedDict, total=False):
    """The image of an image part."""

    url: Required[str]
    detail: Literal["auto", "low", "high", "original"]


class ChatCompletionContentPartImageParam(TypedDict, total=False):
    """An image part (URL or data URL)."""

    image_url: Required[ImageURL]
    type: Required[Literal["image_url"]]
    prompt_cache_breakpoint: PromptCacheBreakpoint


class InputAudio(TypedDict, total=False):
    """The audio of an input-audio part."""

    data: Required[str]
    format: Required[Literal["wav", "mp3"]]


class ChatCompletionContentPartInputAudioParam(TypedDict, total=False):
    """An inline audio part."""

    input_audio: Required[InputAudio]
    type: Required[Literal["input_audio"]]
    prompt_cache_breakpoint: PromptCacheBreakpoint


class FileFile(TypedDict, total=False):
    """The file of a file part."""

    file_data: str
    file_id: str
    filename: str


class File(TypedDict, total=False):
    """A file part."""

    file: Required[FileFile]
    type: Required[Literal["file"]]
    prompt_cache_breakpoint: PromptCacheBreakpoint


class ChatCompletionContentPartRefusalParam(TypedDict, total=False):
    """A refusal part (assistant messages)."""

    refusal: Required[str]
    type: Required[Literal["refusal"]]


class AudioURL(TypedDict, total=False):
    """The audio of an audio-URL part."""

    url: Required[str]


class ChatCompletionContentPartAudioParam(TypedDict, total=False):
    """vLLM's audio-URL part."""

    audio_url: Required[AudioURL]
    type: Required[Literal["audio_url"]]


class VideoURL(TypedDict, total=False):
    """The video of a video-URL part."""

    url: Required[str]


class ChatCompletionContentPartVideoParam(TypedDict, total=False):
    """vLLM's video-URL part."""

    video_url: Required[VideoURL]
    type: Required[Literal["video_url"]]


class Image:
    """Stands in for ``PIL.Image.Image``: nothing a JSON body decodes to is one."""


class PILImage(BaseModel):
    """vLLM's in-process image part; over HTTP it can never validate."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    image_pil: Image


class CustomChatCompletionContentPILImageParam(TypedDict, total=False):
    """vLLM's PIL-image part."""

    image_pil: PILImage | None
    uuid: str | None


class CustomChatCompletionContentSimpleImageParam(TypedDict, total=False):
    """vLLM's bare ``image_url`` part."""

    image_url: str | None
    uuid: str | None


EmbedsPayload: TypeAlias = str | dict[str, str | list[int | float]]


class ChatCompletionContentPartImageEmbedsParam(TypedDict, total=False):
    """vLLM's image-embeddings part."""

    image_embeds: EmbedsPayload | None
    type: Required[Literal["image_embeds"]]
    uuid: str | None


class ChatCompletionContentPartAudioEmbedsParam(TypedDict, total=False):
    """vLLM's audio-embeddings part."""

    audio_embeds: EmbedsPayload | None
    type: Required[Literal["audio_embeds"]]
    uuid: str | None


class ChatCompletionContentPartVideoEmbedsParam(TypedDict, total=False):
    """vLLM's video-embeddings part."""

    video_embeds: EmbedsPayload | None
    type: Required[Literal["video_embeds"]]
    uuid: str | None


class ChatCompletionContentPartPromptEmbedsParam(TypedDict, total=False):
    """vLLM's prompt-embeddings part."""

    data: Required[str]
    type: Required[Literal["prompt_embeds"]]


class CustomChatCompletionContentSimpleAudioParam(TypedDict, total=False):
    """vLLM's bare ``audio_url`` part."""

    audio_url: str | None


class CustomChatCompletionContentSimpleVideoParam(TypedDict, total=False):
    """vLLM's bare ``video_url`` part."""

    video_url: str | None
    uuid: str | None


class CustomChatCompletionContentToolReferenceParam(TypedDict, total=False):
    """vLLM's tool-reference part."""

    name: str
    type: Literal["tool_reference"]


class CustomThinkCompletionContentParam(TypedDict, total=False):
    """vLLM's thinking part."""

    thinking: Required[str]
    closed: bool
    type: Required[Literal["thinking"]]


OpenAIContentPart: TypeAlias = (
    ChatCompletionContentPartTextParam
    | ChatCompletionContentPartImageParam
    | ChatCompletionContentPartInputAudioParam
    | File
)
ContentPart: TypeAlias = (
    OpenAIContentPart
    | ChatCompletionContentPartAudioParam
    | ChatCompletionContentPartInputAudioParam
    | ChatCompletionContentPartVideoParam
    | ChatCompletionContentPartRefusalParam
    | CustomChatCompletionContentPILImageParam
    | CustomChatCompletionContentSimpleImageParam
    | ChatCompletionContentPartImageEmbedsParam
    | ChatCompletionContentPartAudioEmbedsParam
    | ChatCompletionContentPartVideoEmbedsParam
    | ChatCompletionContentPartPromptEmbedsParam
    | CustomChatCompletionContentSimpleAudioParam
    | CustomChatCompletionContentSimpleVideoParam
    | CustomChatCompletionContentToolReferenceParam
    | str
    | CustomThinkCompletionContentParam
)


# -- OpenAI's messages --------------------------------------------------------------------


class ChatCompletionDeveloperMessageParam(TypedDict, total=False):
    """A developer message."""

    content: Required[str | Iterable[ChatCompletionContentPartTextParam]]
    role: Required[Literal["developer"]]
    name: str


class ChatCompletionSystemMessageParam(TypedDict, total=False):
    """A system message."""

    content: Required[str | Iterable[ChatCompletionContentPartTextParam]]
    role: Required[Literal["system"]]
    name: str


class ChatCompletionUserMessageParam(TypedDict, total=False):
    """A user message."""

    content: Required[str | Iterable[OpenAIContentPart]]
    role: Required[Literal["user"]]
    name: str


class Audio(TypedDict, total=False):
    """A reference to earlier audio output."""

    id: Required[str]


class FunctionCall(TypedDict, total=False):
    """The deprecated ``function_call`` of an assistant message."""

    arguments: Required[str]
    name: Required[str]


class Function(TypedDict, total=False):
    """The function a tool call calls."""

    arguments: Required[str]
    name: Required[str]


class ChatCompletionMessageFunctionToolCallParam(TypedDict, total=False):
    """A function tool call."""

    id: Required[str]
    function: Required[Function]
    type: Required[Literal["function"]]


class Custom(TypedDict, total=False):
    """The input a custom tool call passes."""

    input: Required[str]
    name: Required[str]


class ChatCompletionMessageCustomToolCallParam(TypedDict, total=False):
    """A custom tool call."""

    id: Required[str]
    custom: Required[Custom]
    type: Required[Literal["custom"]]


ToolCallParam: TypeAlias = (
    ChatCompletionMessageFunctionToolCallParam | ChatCompletionMessageCustomToolCallParam
)


AssistantContentPart: TypeAlias = (
    ChatCompletionContentPartTextParam | ChatCompletionContentPartRefusalParam
)


class ChatCompletionAssistantMessageParam(TypedDict, total=False):
    """An assistant message."""

    role: Required[Literal["assistant"]]
    audio: Audio | None
    content: str | Iterable[AssistantContentPart] | None
    function_call: FunctionCall | None
    name: str
    refusal: str | None
    tool_calls: Iterable[ToolCallParam]


class ChatCompletionToolMessageParam(TypedDict, total=False):
    """A tool result message."""

    content: Required[str | Iterable[ChatCompletionContentPartTextParam]]
    role: Required[Literal["tool"]]
    tool_call_id: Required[str]


class ChatCompletionFunctionMessageParam(TypedDict, total=False):
    """A (deprecated) function result message."""

    content: Required[str | None]
    name: Required[str]
    role: Required[Literal["function"]]


# -- vLLM's own message, and harmony's ----------------------------------------------------


class ChatCompletionFunctionToolParam(TypedDict, total=False):
    """A tool a developer message declares."""

    function: Required[FunctionDefinitionParam]
    type: Required[Literal["function"]]


class CustomChatCompletionMessageParam(TypedDict, total=False):
    """Any role; vLLM's extension for custom roles and extra message fields."""

    role: Required[str]
    content: str | list[ContentPart]
    name: str
    tool_call_id: str | None
    tool_calls: list[ToolCallParam] | None
    reasoning: str | None
    tools: list[ChatCompletionFunctionToolParam] | None
    task: str | None


class Author(BaseModel):
    """The author of a harmony message."""

    role: Literal["user", "assistant", "system", "developer", "tool"]
    name: str | None = None


class HarmonyContent(BaseModel):
    """harmony's content base class: any object."""


class Message(BaseModel):
    """openai_harmony's ``Message`` (vLLM accepts it in-process; over JSON it needs ``author``)."""

    author: Author
    content: list[HarmonyContent] = []
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None


ChatCompletionMessageParam: TypeAlias = (
    ChatCompletionDeveloperMessageParam
    | ChatCompletionSystemMessageParam
    | ChatCompletionUserMessageParam
    | ChatCompletionAssistantMessageParam
    | ChatCompletionToolMessageParam
    | ChatCompletionFunctionMessageParam
    | CustomChatCompletionMessageParam
    | Message
)


def materialize(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Plain message dicts for the chat template: lazy content lists are read (and so
    checked) now, as vLLM does while rendering; a bad part is a 400, as there."""
    out: list[dict[str, Any]] = []
    try:
        for message in messages:
            if isinstance(message, BaseModel):
                out.append(message.model_dump())
                continue
            message = dict(message)
            for key in ("content", "tool_calls"):
                value = message.get(key)
                if value is not None and not isinstance(value, str | list):
                    message[key] = list(value)
            out.append(message)
    except ValidationError as exc:
        raise RequestError(400, str(exc), "BadRequestError") from None
    return out
