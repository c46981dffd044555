"""The tokenizer service: ``im.tokenize`` (queue group ``tokenizer``).

A prompt (text or token ids) or chat messages (rendered with the model's chat template as vLLM
renders them) become the prompt's token count and one block key per full block
(``libs.kvblock``). Every replica answers alone; nothing is shared but the queue group.

Bad input is a 4xx answer, never a 500: unknown model 404; malformed request, token ids out of
the vocabulary, chat messages or options the template refuses 400.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nats.aio.client import Client
from nats.micro.request import ServiceError

from infermesh.libs.bus import BUS_REGISTRY, BusService, connect, release, reply_error
from infermesh.libs.kvblock import prompt_keys
from infermesh.libs.telemetry import get_logger
from infermesh.libs.telemetry.ops import OpsServer
from infermesh.libs.tinymodel import ensure_model_folder
from infermesh.libs.tokenization import ModelTokenizer, TokenizationError
from infermesh.proto.messages import TokenizeReply, TokenizeRequest
from infermesh.proto.subjects import QUEUE_TOKENIZER, Subjects

from .cache import ByteLRU, CachingTokenizer, ChainNode, EncodePlan, PromptEntry
from .config import TokenizerConfig
from .metrics import CacheCollector, TokenizerMetrics

log = get_logger("tokenizer")

_MB = 1024 * 1024


def _kind(req: TokenizeRequest) -> str:
    if req.messages is not None:
        return "chat"
    return "ids" if isinstance(req.prompt, list) else "text"


class TokenizerService:
    """One tokenizer replica. ``await start()``, then ``await stop()``."""

    def __init__(self, cfg: TokenizerConfig, nc: Client | None = None) -> None:
        self.cfg = cfg
        self.subjects = Subjects(cfg.subject_prefix)
        self.metrics = TokenizerMetrics()
        self.prompt_cache: ByteLRU[Any, PromptEntry] = ByteLRU(
            int(cfg.prompt_cache_mb * _MB), cfg.prompt_cache_entries
        )
        self.chunk_cache: ByteLRU[Any, Any] = ByteLRU(int(cfg.chunk_cache_mb * _MB))
        self.key_cache: ByteLRU[Any, ChainNode] = ByteLRU(int(cfg.key_cache_mb * _MB))
        self.tokenizers: dict[str, CachingTokenizer] = {}
        self.metrics.registry.register(CacheCollector(self))
        self._nc = nc
        self._own_nc = nc is None
        self._service: BusService | None = None
        self._ops: OpsServer | None = None
        # One worker: long cold texts queue up there (the HF tokenizer parallelises each one
        # itself) while the event loop keeps answering cached requests.
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tokenize"
        )
        self.http_port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def load_models(self) -> None:
        """Load every configured model's tokenizer (idempotent); raise on a bad folder."""
        for name, folder in self.cfg.model_folders().items():
            if name in self.tokenizers:
                continue
            tok = ModelTokenizer.from_folder(folder if folder is not None else
                                             ensure_model_folder())
            self.tokenizers[name] = CachingTokenizer(
                name, tok, prompt_cache=self.prompt_cache, chunk_cache=self.chunk_cache,
                key_cache=self.key_cache, chunk_chars=self.cfg.chunk_chars,
            )

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
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _health(self) -> tuple[bool, dict[str, Any]]:
        ok = self._service is not None and self._nc is not None and self._nc.is_connected
        return ok, {
            "models": sorted(self.tokenizers),
            "prompt_cache": {"entries": len(self.prompt_cache), "bytes": self.prompt_cache.bytes},
            "chunk_cache": {"entries": len(self.chunk_cache), "bytes": self.chunk_cache.bytes},
            "key_cache": {"entries": len(self.key_cache), "bytes": self.key_cache.bytes},
        }

    # ------------------------------------------------------------------ im.tokenize

    async def on_tokenize(self, req: TokenizeRequest) -> TokenizeReply:
        """Answer one TokenizeRequest (errors as ``reply_error``), with metrics around it."""
        kind = _kind(req)
        t0 = time.perf_counter()
        try:
            return await self.tokenize(req)
        except ServiceError as e:
            self.metrics.errors.labels(e.code).inc()
            raise
        except Exception:
            self.metrics.errors.labels("500").inc()
            raise
        finally:
            self.metrics.latency.labels(kind).observe(time.perf_counter() - t0)

    async def tokenize(self, req: TokenizeRequest) -> TokenizeReply:
        """Token count, block keys (and ids when asked) of one request."""
        tok = self.tokenizers.get(req.model)
        if tok is None:
            raise reply_error(
                404, f"model {req.model!r} is not served by this tokenizer "
                     f"(served: {', '.join(sorted(self.tokenizers))})"
            )
        if req.block_size < 1:
            raise reply_error(400, f"block_size must be >= 1, got {req.block_size}")
        if (req.prompt is None) == (req.messages is None):
            raise reply_error(400, "give exactly one of 'prompt' and 'messages'")
        self.metrics.requests.labels(req.model, _kind(req)).inc()
        if isinstance(req.prompt, list):
            return self._from_ids(tok, req, req.prompt)
        if req.messages is not None:
            text = self._render(tok, req)
            special = False if req.add_special_tokens is None else req.add_special_tokens
        else:
            text = req.prompt or ""
            special = True if req.add_special_tokens is None else req.add_special_tokens
        plan = await self._encode(tok, text, special)
        keys = tok.block_keys(plan, req.model, req.block_size, lora_name=req.lora_name,
                              cache_salt=req.cache_salt)
        entry = plan.entry
        assert entry is not None
        self.metrics.tokens.labels(req.model).inc(len(entry.ids))
        return TokenizeReply(
            num_tokens=len(entry.ids),
            block_keys=keys.tolist(),
            token_ids=entry.ids.tolist() if req.return_token_ids else None,
        )

    def _from_ids(self, tok: CachingTokenizer, req: TokenizeRequest,
                  ids: list[int]) -> TokenizeReply:
        vocab = tok.tok.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise reply_error(400, f"token id {bad} is out of vocabulary [0, {vocab})")
        keys = prompt_keys(req.model, ids, req.block_size, lora_name=req.lora_name,
                           cache_salt=req.cache_salt)
        self.metrics.tokens.labels(req.model).inc(len(ids))
        return TokenizeReply(num_tokens=len(ids), block_keys=keys,
                             token_ids=ids if req.return_token_ids else None)

    def _render(self, tok: CachingTokenizer, req: TokenizeRequest) -> str:
        if req.chat_template is not None and not self.cfg.trust_request_chat_template:
            raise reply_error(400, "chat_template is not accepted by this tokenizer "
                                   "(trust_request_chat_template is off)")
        assert req.messages is not None
        try:
            return tok.tok.render_chat(
                req.messages,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                tools=req.tools,
                documents=req.documents,
                chat_template_kwargs=req.chat_template_kwargs,
                chat_template=req.chat_template,
            )
        except TokenizationError as e:
            raise reply_error(400, str(e)) from None
        except Exception as e:  # a request's template or values broke rendering: its fault
            log.info("chat_render_failed", error=repr(e))
            raise reply_error(400, f"chat template failed to render: {e!r}") from None

    async def _encode(self, tok: CachingTokenizer, text: str, special: bool) -> EncodePlan:
        plan = tok.plan(text, special)
        try:
            if plan.missing_chars > self.cfg.offload_chars and self._executor is not None:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, tok.run, plan)
            else:
                tok.run(plan)
        except TokenizationError as e:
            raise reply_error(400, str(e)) from None
        tok.finish(plan)
        return plan
