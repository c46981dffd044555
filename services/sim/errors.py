"""vLLM 0.32's error bodies and the one exception that carries them, :class:`RequestError`.

Three families of request error exist in vLLM 0.32, and each keeps its shape here:

* schema errors (malformed JSON, wrong types, constraint violations) come from
  FastAPI/pydantic: 400, ``"type": "Bad Request"``, ``param`` the cleaned location
  such as ``"body.max_tokens"``, the message listing pydantic's errors (:func:`schema_error`);
* vLLM's own checks (request validators, sampling parameters, context length):
  400, ``"type": "BadRequestError"``, ``param`` the parameter or null (:func:`invalid_request`);
* a body that is not UTF-8 or nests too deeply fails inside FastAPI before any
  of that and is answered ``{"detail": "There was an error parsing the body"}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from .encoding import to_json

__all__ = [
    "PARSE_FAILURE",
    "RequestError",
    "error_body",
    "invalid_request",
    "json_invalid",
    "model_not_found",
    "parse_failure",
    "schema_error",
    "stream_error_event",
    "unsupported_media_type",
]

PARSE_FAILURE = "There was an error parsing the body"

# vLLM bounds what one refused request can echo back: a small body failing
# per element must not turn into a megabyte-sized error.
_MAX_REPORTED_ERRORS = 10
_MAX_INPUT_CHARS = 200
_MAX_ERROR_CHARS = 1000


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

    Like vLLM's ``VLLMValidationError`` it is not a ``ValueError``, so raised from
    inside a pydantic validator it passes through validation untouched.
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
        #: pydantic's error entries behind a schema error (empty otherwise)
        self.errors: list[dict[str, Any]] = []

    def body(self) -> bytes:
        """The JSON body vLLM sends with this error."""
        if self.detail_only:
            return to_json({"detail": self.message})
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
    return to_json(ErrorResponse(ErrorInfo(_sanitize(message), type, param, code)))


def stream_error_event(message: str, type: str = "InternalServerError", code: int = 500) -> bytes:
    """An SSE event carrying an error in the middle of a stream.

    vLLM writes these with ``json.dumps`` (spaces after ``:`` and ``,``), unlike
    every other body; ``data: [DONE]`` still follows.
    """
    doc = {"error": {"message": _sanitize(message), "type": type, "param": None, "code": code}}
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def _text(value: Any) -> str:
    """``str(value)``; Python refuses to print ints past 4300 digits."""
    try:
        return str(value)
    except ValueError:
        return f"<{type(value).__name__}>"


def _bounded(text: str) -> str:
    return text if len(text) <= _MAX_INPUT_CHARS else text[:_MAX_INPUT_CHARS] + "...[truncated]"


def invalid_request(message: str, parameter: str | None = None, value: Any = None) -> RequestError:
    """vLLM's ``VLLMValidationError``: 400, message suffixed ``(parameter=..., value=...)``."""
    extras = []
    if parameter is not None:
        extras.append(f"parameter={parameter}")
    if value is not None:
        extras.append(f"value={_text(value)}")
    text = f"{message} ({', '.join(extras)})" if extras else message
    return RequestError(400, text, "BadRequestError", parameter)


def model_not_found(model: str, served: Sequence[str]) -> RequestError:
    """404 for a ``model`` that is neither a served name nor a loaded adapter."""
    return RequestError(
        404,
        f"The model `{model}` does not exist. Valid aliases: {', '.join(served)}.",
        "NotFoundError",
        "model",
    )


def unsupported_media_type() -> RequestError:
    """vLLM's refusal of a Content-Type other than ``application/json``."""
    return RequestError(
        400,
        "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
        "Bad Request",
        None,
    )


def parse_failure() -> RequestError:
    """FastAPI's answer to a body it cannot even parse (not UTF-8, nested too deep)."""
    return RequestError(400, PARSE_FAILURE, "Bad Request", detail_only=True)


def json_invalid(position: int, reason: str) -> RequestError:
    """FastAPI's schema error for malformed JSON (``json.JSONDecodeError``'s position and text)."""
    return schema_error(
        [
            {
                "type": "json_invalid",
                "loc": ("body", position),
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": reason},
            }
        ]
    )


# -- pydantic's errors, reported the way vLLM's validation handler does -----------------

_BRACKETED = re.compile(r"[\[\](){}]")
# pydantic-core's names for wrapper and union-branch schemas; they are not fields.
_INTERNAL_LOC = frozenset(
    "function-wrap function-after function-before function-plain json-or-python lax-or-strict "
    "chain default nullable tagged-union union call arguments is-instance is-subclass callable "
    "str int float bool bytes bytearray list tuple dict set frozenset complex none "
    "nonetype".split()
)


def clean_loc(loc: Sequence[Any]) -> str:
    """A pydantic ``loc`` as the dotted path vLLM reports, schema-internal segments dropped."""
    parts = [str(p) for p in loc]
    kept = [p for p in parts if not (_BRACKETED.search(p) or p.lower() in _INTERNAL_LOC)]
    return ".".join(kept or parts)


def _summarize_input(value: Any) -> Any:
    if isinstance(value, str):
        return _bounded(value)
    if isinstance(value, bytes | bytearray):
        return f"<{type(value).__name__} of {len(value)} bytes>"
    if isinstance(value, list | tuple | set | frozenset | dict):
        return f"<{type(value).__name__} of {len(value)} items>"
    return _bounded(_text(value))


def _format_error(error: Mapping[str, Any]) -> str:
    shown = dict(error)
    if "input" in shown:
        shown["input"] = _summarize_input(shown["input"])
    if isinstance(shown.get("loc"), tuple | list):
        shown["loc"] = clean_loc(shown["loc"])
    text = str(shown)
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "...[truncated]"


def schema_error(errors: Sequence[Mapping[str, Any]]) -> RequestError:
    """FastAPI's RequestValidationError as vLLM answers it: 400 ``Bad Request``, the first
    error's location as ``param``, at most ten errors listed.

    ``errors`` are pydantic's ``errors(include_url=False)`` entries with ``"body"``
    already in front of each ``loc``.
    """
    count = len(errors)
    label = "error" if count == 1 else "errors"
    message = f"{count} validation {label}:\n"
    message += "".join(f"  {_format_error(e)}\n" for e in errors[:_MAX_REPORTED_ERRORS])
    if count > _MAX_REPORTED_ERRORS:
        message += f"  ...and {count - _MAX_REPORTED_ERRORS} more {label}\n"
    param = clean_loc(errors[0]["loc"]) if errors else None
    failure = RequestError(400, message.rstrip(), "Bad Request", param)
    failure.errors = [dict(e) for e in errors]
    return failure
