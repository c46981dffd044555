"""Tokenization and chat-template rendering exactly as vLLM does it.

Every service that turns text or chat messages into token ids (tokenizer,
simulator, benchmarks) uses :class:`ModelTokenizer`, so prompt ids and block keys
agree with what a real vLLM server computes for the same model folder.

Example::

    tok = ModelTokenizer.from_folder(ensure_model_folder())
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    detok = tok.detokenizer(ids)
    text = "".join(detok.step(t) for t in generated_ids)
"""

from .chat import (
    CompiledChatTemplate,
    compile_template,
    flatten_content,
    make_environment,
    normalize_messages,
)
from .detokenizer import IncrementalDetokenizer
from .errors import ChatTemplateError, TokenizationError
from .tokenizer import ModelTokenizer

__all__ = [
    "ChatTemplateError",
    "CompiledChatTemplate",
    "IncrementalDetokenizer",
    "ModelTokenizer",
    "TokenizationError",
    "compile_template",
    "flatten_content",
    "make_environment",
    "normalize_messages",
]
