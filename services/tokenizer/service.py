"""The tokenizer service: ``im.tokenize`` and ``im.route`` (queue group ``tokenizer``).

A prompt (text or token ids) or chat messages become the prompt's token count and block keys
(:mod:`infermesh.libs.tokenization.prompts`, which an ingress with the model's tokenizer also runs
in its own process). Every replica answers alone; nothing is shared but the queue group.

Bad input is a 4xx answer, never a 500: unknown model 404; malformed request, token ids out of
the vocabulary, chat messages or options the template refuses 400. A text whose never-seen part
is long is answered early (``partial``), with the keys of the text seen before.
"""

from __future__ import annotations

from typing import Any

import msgspec
from nats.aio.client import Client

from infermesh.libs.bus import BUS_REGISTRY, BusService, Forward, connect, release, reply_error
from infermesh.libs.telemetry import get_logger
from infermesh.libs.telemetry.ops import OpsServer
from infermesh.libs.tokenization.cache import ByteLRU, CachingTokenizer, ChainNode, PromptEntry
from infermesh.libs.tokenization.metrics import TokenizerMetrics
from infermesh.libs.tokenization.prompts import PromptError, PromptTokenizer
from infermesh.proto.messages import RouteRequest, TokenizeReply, TokenizeRequest
from infermesh.proto.subjects import QUEUE_TOKENIZER, Subjects

from .config import TokenizerConfig

log = get_logger("tokenizer")


class TokenizerService:
    """One tokenizer replica. ``await start()``, then ``await stop()``."""

    def __init__(self, cfg: TokenizerConfig, nc: Client | None = None) -> None:
        self.cfg = cfg
        self.subjects = Subjects(cfg.subject_prefix)
        self.core = PromptTokenizer(cfg)
        self._nc = nc
        self._own_nc = nc is None
        self._service: BusService | None = None
        self._ops: OpsServer | None = None
        self.http_port: int | None = None

    # The core's parts, as the tests and the health page read them.
    @property
    def metrics(self) -> TokenizerMetrics:
        return self.core.metrics

    @property
    def tokenizers(self) -> dict[str, CachingTokenizer]:
        return self.core.tokenizers

    @property
    def prompt_cache(self) -> ByteLRU[Any, PromptEntry]:
        return self.core.prompt_cache

    @property
    def chunk_cache(self) -> ByteLRU[Any, Any]:
        return self.core.chunk_cache

    @property
    def key_cache(self) -> ByteLRU[Any, ChainNode]:
        return self.core.key_cache

    # ------------------------------------------------------------------ lifecycle

    def load_models(self) -> None:
        """Load every configured model's tokenizer (idempotent); raise on a bad folder."""
        self.core.load_models()

    async def start(self) -> None:
        """Load the models, connect to the bus, serve ``im.tokenize`` and /health, /metrics."""
        self.load_models()
        if self._nc is None:
            self._nc = await connect(self.cfg.nats_url, "tokenizer",
                                     security=self.cfg.bus_security())
        svc = BusService(
            self._nc,
            "infermesh-tokenizer",
            description="Prompt or chat → token count and block keys",
            registry=self.metrics.registry,
            metadata={"models": ",".join(self.tokenizers)},
        )
        svc.endpoint("tokenize", self.subjects.tokenize, TokenizeRequest, self.on_tokenize,
                     queue_group=QUEUE_TOKENIZER)
        svc.endpoint("route", self.subjects.route, RouteRequest, self.on_route,
                     queue_group=QUEUE_TOKENIZER)
        await svc.start()
        self._service = svc
        if self.cfg.http_port >= 0:
            self._ops = OpsServer([self.metrics.registry, BUS_REGISTRY], self._health)
            self.http_port = await self._ops.start(self.cfg.http_host, self.cfg.http_port)
        log.info(
            "tokenizer_started",
            subject=self.subjects.tokenize,
            models={n: t.tok.name_or_path for n, t in self.tokenizers.items()},
            chunking={n: t.chunking_off_reason or "on" for n, t in self.tokenizers.items()},
            http_port=self.http_port,
        )

    async def stop(self) -> None:
        """Stop answering and release everything this service started."""
        await release(service=self._service, ops=self._ops,
                      nc=self._nc if self._own_nc else None)
        self._service, self._ops = None, None
        await self.core.close()

    async def drain(self) -> None:
        """Wait until no background tokenization runs (those after early replies)."""
        await self.core.drain()

    def _health(self) -> tuple[bool, dict[str, Any]]:
        ok = self._service is not None and self._nc is not None and self._nc.is_connected
        return ok, {
            "models": sorted(self.tokenizers),
            "prompt_cache": {"entries": len(self.prompt_cache), "bytes": self.prompt_cache.bytes},
            "chunk_cache": {"entries": len(self.chunk_cache), "bytes": self.chunk_cache.bytes},
            "key_cache": {"entries": len(self.key_cache), "bytes": self.key_cache.bytes},
        }

    # ------------------------------------------------------------------ im.tokenize

    async def on_route(self, req: RouteRequest) -> Forward:
        """``im.route``: tokenize, then pass the ScheduleRequest, keys and count filled in, on to
        the schedulers with the caller's reply subject; the decision goes straight back."""
        reply = await self.on_tokenize(req.tokenize)
        sched = msgspec.structs.replace(req.schedule, num_tokens=reply.num_tokens,
                                        block_keys=reply.block_keys,
                                        tokens_partial=reply.partial)
        return Forward(self.subjects.schedule, sched)

    async def on_tokenize(self, req: TokenizeRequest) -> TokenizeReply:
        """Answer one TokenizeRequest (errors as ``reply_error``), with metrics around it."""
        try:
            return await self.core.answer(req)
        except PromptError as e:
            raise reply_error(e.status, e.message) from None

    async def tokenize(self, req: TokenizeRequest) -> TokenizeReply:
        """The core's answer without the metrics around it (errors as ``reply_error``)."""
        try:
            return await self.core.tokenize(req)
        except PromptError as e:
            raise reply_error(e.status, e.message) from None
