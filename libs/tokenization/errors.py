"""Errors raised by :mod:`infermesh.libs.tokenization`.

All of them are ``ValueError`` subclasses so HTTP layers can map them to a 400
"BadRequestError" the way vLLM does.
"""

from __future__ import annotations


class TokenizationError(ValueError):
    """Invalid input to the tokenizer (bad text, ids, or model folder)."""


class ChatTemplateError(TokenizationError):
    """The chat request cannot be rendered (bad messages, template error, ...)."""
