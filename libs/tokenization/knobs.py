"""The knobs of a process that tokenizes prompts for routing: the tokenizer service, and an
ingress that tokenizes the models it has the tokenizer of (no bus trip for that step)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from infermesh.libs.config import knob
from infermesh.libs.tinymodel import DEFAULT_MODEL_NAME


@dataclass
class TokenizingKnobs:
    """Models, caches and early replies; a service's config inherits them with its own."""

    models: list[str] = knob(
        None,
        "Models tokenized here, as NAME=FOLDER (a bare FOLDER is served under its own path, as "
        "vLLM does); empty: the tiny model as infermesh/tiny-llama",
        factory=list,
    )
    prompt_cache_mb: float = knob(
        64.0, "Memory for whole prompts (and rendered chats) with their ids and keys; 0: off"
    )
    prompt_cache_entries: int = knob(4096, "Whole prompts kept at most")
    chunk_cache_mb: float = knob(
        256.0, "Memory for tokenized chunks of prompts (shared prefixes); 0: off"
    )
    key_cache_mb: float = knob(
        64.0, "Memory for the block keys of chained chunks (prompts sharing a prefix); 0: off"
    )
    chunk_chars: int = knob(
        2048, "Chunks are cut at the first safe boundary after this many characters"
    )
    offload_chars: int = knob(
        16384,
        "Texts with more characters left to tokenize than this are tokenized in a worker "
        "thread, so the event loop keeps answering cached requests",
    )
    early_reply_chars: int = knob(
        512,
        "A text (or rendered chat) with more never-seen characters than this (after the first "
        "piece the chunk cache lacks) is answered at once with the block keys of the text seen "
        "before (text never seen cannot match a cached block), its token count estimated and "
        "the answer marked partial; the rest is tokenized in the background for the caches. "
        "0: off",
    )
    early_reply_jobs: int = knob(
        2,
        "Background tokenizations (after early replies) at most at once; past that, texts "
        "are tokenized before the answer",
    )
    trust_request_chat_template: bool = knob(
        True,
        "Accept a request's own chat_template (vLLM wants --trust-request-chat-template for it; "
        "the ingress enforces that policy, this step only renders)",
    )

    def check_tokenizing(self) -> None:
        """Validate these knobs (a config's ``__post_init__`` calls it)."""
        self.model_folders()  # validates the entries
        if min(self.prompt_cache_mb, self.chunk_cache_mb, self.key_cache_mb) < 0:
            raise ValueError("cache sizes must not be negative")
        if self.prompt_cache_entries < 0:
            raise ValueError("prompt_cache_entries must not be negative")
        if self.chunk_chars < 1:
            raise ValueError("chunk_chars must be positive")
        if self.early_reply_chars < 0 or self.early_reply_jobs < 0:
            raise ValueError("early_reply_chars and early_reply_jobs must not be negative")

    def model_folders(self) -> dict[str, Path | None]:
        """Served model name → folder (None: the tiny model, built on first use)."""
        if not self.models:
            return {DEFAULT_MODEL_NAME: None}
        out: dict[str, Path | None] = {}
        for entry in self.models:
            name, sep, folder = entry.partition("=")
            if not sep:
                name = folder = entry
            name, folder = name.strip(), folder.strip()
            if not name or not folder:
                raise ValueError(f"models: {entry!r} is not NAME=FOLDER")
            if name in out:
                raise ValueError(f"models: {name!r} is given twice")
            out[name] = Path(folder).expanduser()
        return out
