"""``ModelTokenizer``: a model folder's tokenizer and chat template, vLLM-exact.

vLLM's rules this class follows (vLLM 0.32):

- completions prompts are encoded with ``add_special_tokens=True`` (the
  tokenizer's post-processor prepends BOS); chat prompts are rendered with the
  chat template and the text is encoded with ``add_special_tokens=False`` (the
  template already wrote BOS) -- ``vllm/renderers/base.py``
  (``default_cmpl_tok_params`` / ``default_chat_tok_params``) and the
  ``add_special_tokens`` defaults of the completion and chat request models.
- output text is decoded with ``skip_special_tokens=True`` by default and
  streamed through an incremental detokenizer primed with the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .chat import CompiledChatTemplate, compile_template, normalize_messages, render
from .detokenizer import IncrementalDetokenizer
from .errors import ChatTemplateError, TokenizationError

_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizationError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special-token entry is a string or an AddedToken-like dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class ModelTokenizer:
    """Tokenizer, chat template and limits of one HF-style model folder."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        tokenizer_config: Mapping[str, Any] | None = None,
        model_config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        max_model_len: int | None = None,
        name_or_path: str = "",
    ) -> None:
        """Wrap a ``tokenizers.Tokenizer``; use :meth:`from_folder` normally."""
        self._tok = tokenizer
        self.name_or_path = name_or_path
        tok_cfg = dict(tokenizer_config or {})
        model_cfg = dict(model_config or {})
        gen_cfg = dict(generation_config or {})

        self.special_tokens: dict[str, str] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            text = _token_text(tok_cfg.get(key))
            if text is not None:
                self.special_tokens[key] = text
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")
        self.bos_token_id: int | None = self._id_of(self.bos_token)
        self.eos_token_id: int | None = self._id_of(self.eos_token)

        stops: list[int] = []
        if self.eos_token_id is not None:
            stops.append(self.eos_token_id)
        extra = gen_cfg.get("eos_token_id", model_cfg.get("eos_token_id"))
        for token_id in extra if isinstance(extra, list) else [extra]:
            if isinstance(token_id, int) and token_id not in stops:
                stops.append(token_id)
        #: Ids that end generation: the tokenizer's EOS plus generation_config's.
        self.stop_token_ids: tuple[int, ...] = tuple(stops)

        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        if max_model_len is None:
            max_model_len = model_cfg.get("max_position_embeddings")
        if not isinstance(max_model_len, int):
            model_max = tok_cfg.get("model_max_length")
            max_model_len = model_max if isinstance(model_max, int) else None
        #: Context length in tokens (prompt + output), as vLLM derives it.
        self.max_model_len: int | None = max_model_len

        template = tok_cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self._compiled: CompiledChatTemplate | None = (
            compile_template(self.chat_template) if self.chat_template else None
        )
        self._special_ids = frozenset(
            token_id
            for token_id, added in self._tok.get_added_tokens_decoder().items()
            if added.special
        )

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_folder(cls, path: str | Path, *, max_model_len: int | None = None) -> ModelTokenizer:
        """Load ``tokenizer.json`` and the JSON configs from a model folder."""
        from tokenizers import Tokenizer

        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizationError(f"{folder} has no tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust side raises plain Exception
            raise TokenizationError(f"cannot load {tok_file}: {exc}") from exc
        return cls(
            tokenizer,
            tokenizer_config=_read_json(folder / "tokenizer_config.json"),
            model_config=_read_json(folder / "config.json"),
            generation_config=_read_json(folder / "generation_config.json"),
            max_model_len=max_model_len,
            name_or_path=str(folder),
        )

    # ----------------------------------------------------------------- helpers

    @property
    def backend(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of all special (added, ``special=True``) tokens."""
        return self._special_ids

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary token, or None."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary string of an id, or None."""
        return self._tok.id_to_token(token_id)

    def _check_ids(self, ids: Iterable[Any]) -> list[int]:
        out = list(ids)
        vocab = self.vocab_size
        for token_id in out:
            if isinstance(token_id, bool) or not isinstance(token_id, int):
                raise TokenizationError(f"token ids must be integers, got {token_id!r}")
            if not 0 <= token_id < vocab:
                raise TokenizationError(f"token id {token_id} is out of range [0, {vocab})")
        return out

    # ----------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; BOS is prepended when ``add_special_tokens``."""
        if not isinstance(text, str):
            raise TokenizationError(f"text must be a string, got {type(text).__name__}")
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError as exc:  # e.g. a lone surrogate that is not valid UTF-8
            raise TokenizationError(f"text cannot be tokenized: {exc}") from exc

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """Encode several texts (in parallel on the Rust side)."""
        for text in texts:
            if not isinstance(text, str):
                raise TokenizationError(f"text must be a string, got {type(text).__name__}")
        try:
            encodings = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        except TypeError as exc:
            raise TokenizationError(f"text cannot be tokenized: {exc}") from exc
        return [enc.ids for enc in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (special tokens dropped by default, like vLLM's output)."""
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(
        self, prompt_ids: Sequence[int] | None = None, *, skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """A streaming detokenizer primed with ``prompt_ids``."""
        prompt = self._check_ids(prompt_ids) if prompt_ids else None
        return IncrementalDetokenizer(self._tok, prompt, skip_special_tokens=skip_special_tokens)

    def stream_decode(
        self,
        ids: Iterable[int],
        *,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> list[str]:
        """Deltas an incremental detokenizer yields for ``ids``, one per id."""
        detok = self.detokenizer(prompt_ids, skip_special_tokens=skip_special_tokens)
        return [detok.step(token_id) for token_id in self._check_ids(ids)]

    # ----------------------------------------------------------------- chat

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        continue_final_message: bool = False,
        documents: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
    ) -> str:
        """Render OpenAI chat ``messages`` to prompt text as vLLM's chat endpoint does.

        ``tools`` are passed to the template as given (vLLM passes each request
        tool's ``model_dump()``). ``chat_template`` overrides the folder's
        template (vLLM accepts that only with ``--trust-request-chat-template``).
        """
        source = chat_template if chat_template is not None else self.chat_template
        if source is None:
            raise ChatTemplateError(
                "this model has no chat template; the chat completions API cannot be used"
            )
        compiled = self._compiled if chat_template is None else compile_template(source)
        assert compiled is not None
        conversation = normalize_messages(messages)
        return render(
            compiled,
            conversation,
            special_tokens=self.special_tokens,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            chat_template_kwargs=chat_template_kwargs,
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        continue_final_message: bool = False,
        documents: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """Prompt ids vLLM's chat endpoint would build for ``messages``.

        The rendered text is encoded with ``add_special_tokens=False`` (vLLM's
        chat default; the request field ``add_special_tokens`` may turn it on).
        """
        text = self.render_chat(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            chat_template_kwargs=chat_template_kwargs,
            continue_final_message=continue_final_message,
            documents=documents,
            chat_template=chat_template,
        )
        return self.encode(text, add_special_tokens=add_special_tokens)

    def __repr__(self) -> str:
        return (
            f"ModelTokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"max_model_len={self.max_model_len})"
        )
