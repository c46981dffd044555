"""Configuration of the tokenizer service (CLI, env ``INFERMESH_TOKENIZER_*``, file)."""

from __future__ import annotations

from dataclasses import dataclass

from infermesh.libs.bus import BusKnobs
from infermesh.libs.config import knob
from infermesh.libs.tokenization.knobs import TokenizingKnobs


@dataclass
class TokenizerConfig(BusKnobs, TokenizingKnobs):
    """Every knob of `infermesh tokenizer`; replicas share ``im.tokenize`` in a queue group."""

    http_host: str = knob("127.0.0.1", "Address of the service's own /health and /metrics")
    http_port: int = knob(0, "Port of the service's own HTTP server (0: a free port, -1: none)")

    def __post_init__(self) -> None:
        self.check_tokenizing()
