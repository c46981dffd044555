"""Prompt or chat messages → token count and block keys, as the tokenizer service answers them
and as an ingress that has a model's tokenizer computes them itself (no bus trip).

A prompt (text or token ids) or chat messages (rendered with the model's chat template as vLLM
renders them) become the prompt's token count and one block key per full block
(``libs.kvblock``). Bad input is a :class:`PromptError` with an HTTP status: unknown model 404;
token ids out of the vocabulary, chat messages or options the template refuses 400.

A text whose never-seen part is long is answered early. Text never tokenized here cannot match a
block cached on an engine (every request's prompt comes through a tokenizer, and a block key
chains over the whole prefix), and text seen before reaches at most into the first chunk the
chunk cache lacks. So the keys of the text seen before are all the routing can use: the answer
carries them, an estimated ``num_tokens`` and ``partial``, and the rest is tokenized in the
background so that the caches hold it for the next request.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from infermesh.libs.kvblock import prompt_keys
from infermesh.libs.telemetry import get_logger
from infermesh.libs.tinymodel import ensure_model_folder
from infermesh.proto.messages import TokenizeReply, TokenizeRequest

from .cache import ByteLRU, CachingTokenizer, ChainNode, EncodePlan, PromptEntry
from .errors import TokenizationError
from .knobs import TokenizingKnobs
from .metrics import CacheCollector, TokenizerMetrics
from .tokenizer import ModelTokenizer

log = get_logger("tokenizer")

_MB = 1024 * 1024
# How long a background tokenization waits before it starts: the early answer goes out first
# and, in an ingress that tokenizes itself, its request is decided and sent on (the background's
# Python steps would otherwise hold the GIL in the middle of that).
_BACKGROUND_DELAY_S = 0.02


class PromptError(Exception):
    """A request this tokenizer refuses: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _kind(req: TokenizeRequest) -> str:
    if req.messages is not None:
        return "chat"
    return "ids" if isinstance(req.prompt, list) else "text"


class PromptTokenizer:
    """The models' tokenizers with their caches, metrics and background work.

    ``load_models()``, then ``await tokenize(req)`` (or :meth:`answer`, which also counts errors
    and times the request); ``await close()`` at the end.
    """

    def __init__(self, cfg: TokenizingKnobs) -> None:
        self.cfg = cfg
        self.metrics = TokenizerMetrics()
        self.prompt_cache: ByteLRU[Any, PromptEntry] = ByteLRU(
            int(cfg.prompt_cache_mb * _MB), cfg.prompt_cache_entries
        )
        self.chunk_cache: ByteLRU[Any, Any] = ByteLRU(int(cfg.chunk_cache_mb * _MB))
        self.key_cache: ByteLRU[Any, ChainNode] = ByteLRU(int(cfg.key_cache_mb * _MB))
        self.tokenizers: dict[str, CachingTokenizer] = {}
        self.metrics.registry.register(CacheCollector(self))
        # One worker: long cold texts queue up there (the HF tokenizer parallelises each one
        # itself) while the event loop keeps answering cached requests.
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tokenize"
        )
        # Tokenizations after an early reply, in their own worker so that a request tokenized
        # before its reply never queues behind them; by (model, special tokens, text).
        self._bg_executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tokenize-bg"
        )
        self._jobs: dict[tuple[str, bool, str], asyncio.Task[None]] = {}

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

    async def close(self) -> None:
        """Cancel the background work and stop the worker threads."""
        jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        for executor in (self._executor, self._bg_executor):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._bg_executor = None

    async def drain(self) -> None:
        """Wait until no background tokenization runs (those after early replies)."""
        while self._jobs:
            await asyncio.gather(*self._jobs.values(), return_exceptions=True)

    async def answer(self, req: TokenizeRequest) -> TokenizeReply:
        """:meth:`tokenize`, with the errors counted and the time measured."""
        kind = _kind(req)
        t0 = time.perf_counter()
        try:
            return await self.tokenize(req)
        except PromptError as e:
            self.metrics.errors.labels(str(e.status)).inc()
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
            raise PromptError(
                404, f"model {req.model!r} is not served by this tokenizer "
                     f"(served: {', '.join(sorted(self.tokenizers))})"
            )
        if req.block_size < 1:
            raise PromptError(400, f"block_size must be >= 1, got {req.block_size}")
        if (req.prompt is None) == (req.messages is None):
            raise PromptError(400, "give exactly one of 'prompt' and 'messages'")
        self.metrics.requests.labels(req.model, _kind(req)).inc()
        if isinstance(req.prompt, list):
            return self._from_ids(tok, req, req.prompt)
        if req.messages is not None:
            text = self._render(tok, req)
            special = False if req.add_special_tokens is None else req.add_special_tokens
        else:
            text = req.prompt or ""
            special = True if req.add_special_tokens is None else req.add_special_tokens
        plan = tok.plan(text, special)
        if not req.return_token_ids and self._answers_early(plan):
            reply = await self._early_reply(tok, plan, req)
            if reply is not None:
                return reply
        plan = await self._encode(tok, plan)
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
            raise PromptError(400, f"token id {bad} is out of vocabulary [0, {vocab})")
        keys = prompt_keys(req.model, ids, req.block_size, lora_name=req.lora_name,
                           cache_salt=req.cache_salt)
        self.metrics.tokens.labels(req.model).inc(len(ids))
        return TokenizeReply(num_tokens=len(ids), block_keys=keys,
                             token_ids=ids if req.return_token_ids else None)

    def _render(self, tok: CachingTokenizer, req: TokenizeRequest) -> str:
        if req.chat_template is not None and not self.cfg.trust_request_chat_template:
            raise PromptError(400, "chat_template is not accepted by this tokenizer "
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
            raise PromptError(400, str(e)) from None
        except Exception as e:  # a request's template or values broke rendering: its fault
            log.info("chat_render_failed", error=repr(e))
            raise PromptError(400, f"chat template failed to render: {e!r}") from None

    # ------------------------------------------------------------------ early replies

    def _answers_early(self, plan: EncodePlan) -> bool:
        """Whether the plan's never-seen part (after the head of its first missing chunk: the
        pieces seen before and the next one, which may hold text seen before) is long enough
        to answer before tokenizing it."""
        return (
            self.cfg.early_reply_chars > 0
            and plan.entry is None
            and not plan.whole  # without chunks, "not cached" does not mean "never seen"
            and self.chunk_cache.max_bytes > 0
            and self._bg_executor is not None
            and bool(plan.missing)
            and plan.missing_chars - plan.head_chars - len(plan.head_piece or "")
            > self.cfg.early_reply_chars
        )

    async def _early_reply(self, tok: CachingTokenizer, plan: EncodePlan,
                           req: TokenizeRequest) -> TokenizeReply | None:
        """The partial reply of a plan with a long never-seen part: the head of its first
        missing chunk (the pieces seen before, and the next one) tokenized now, the rest handed
        to the background; None when the background is full (the caller tokenizes the rest
        now)."""
        job_key = (tok.name, plan.add_special_tokens, plan.text)
        if job_key not in self._jobs and len(self._jobs) >= self.cfg.early_reply_jobs:
            self.metrics.background.labels("inlined").inc()
            return None
        await self._run_head(tok, plan)
        if job_key in self._jobs:  # the same text, answered early a moment ago
            self.metrics.background.labels("joined").inc()
        elif len(self._jobs) >= self.cfg.early_reply_jobs:  # filled while the first chunk ran
            self.metrics.background.labels("inlined").inc()
            return None
        else:
            self.metrics.background.labels("started").inc()
            job = asyncio.get_running_loop().create_task(self._background(tok, plan, req))
            self._jobs[job_key] = job
            job.add_done_callback(lambda _: self._job_done(job_key))
            self.metrics.background_running.set(len(self._jobs))
        known, keys = tok.known_prefix(plan, req.model, req.block_size, lora_name=req.lora_name,
                                       cache_salt=req.cache_salt)
        estimate, bound = self._estimate(tok, plan, known)
        self.metrics.partial.labels(req.model).inc()
        self.metrics.tokens.labels(req.model).inc(estimate)
        return TokenizeReply(num_tokens=estimate, block_keys=keys.tolist(), partial=True,
                             known_tokens=known, max_num_tokens=bound)

    @staticmethod
    def _estimate(tok: CachingTokenizer, plan: EncodePlan, known: int) -> tuple[int, int]:
        """(estimate, upper bound) of the token count of a plan's text whose first ``known``
        tokens are counted: the rest's characters over the model's characters per token, and
        its UTF-8 bytes (a byte-level BPE, which chunking requires, gives at most one token per
        byte) plus the special tokens after the text."""
        rest = plan.text[plan.known_chars :]
        n_bytes = len(rest) if rest.isascii() else len(rest.encode("utf-8", "surrogatepass"))
        bound = known + n_bytes + len(tok.affixes[1] if plan.add_special_tokens and tok.affixes
                                      else ())
        estimate = known + max(1, math.ceil(len(rest) / tok.chars_per_token))
        return min(estimate, bound), bound

    async def _background(self, tok: CachingTokenizer, plan: EncodePlan,
                          req: TokenizeRequest) -> None:
        """Tokenize an early-answered plan and store it (ids, chunks, key chain) in the caches.

        It starts once the reply is out, and tokenizes one chunk at a time: a core stays free
        for the requests (and, on a small machine, for the ingress that waits for the reply).
        """
        try:
            assert self._bg_executor is not None
            await asyncio.sleep(_BACKGROUND_DELAY_S)
            await asyncio.get_running_loop().run_in_executor(
                self._bg_executor, functools.partial(tok.run, plan, parallel=False))
            tok.finish(plan)
            tok.block_keys(plan, req.model, req.block_size, lora_name=req.lora_name,
                           cache_salt=req.cache_salt)
        except Exception as e:  # the reply went out: the engine answers for this text
            self.metrics.background.labels("failed").inc()
            log.info("background_tokenize_failed", model=req.model, error=repr(e))

    def _job_done(self, job_key: tuple[str, bool, str]) -> None:
        self._jobs.pop(job_key, None)
        self.metrics.background_running.set(len(self._jobs))

    # ------------------------------------------------------------------ tokenizing now

    async def _encode(self, tok: CachingTokenizer, plan: EncodePlan) -> EncodePlan:
        """The plan run and finished (after the background's run of the same text, if any)."""
        if plan.entry is None and self._jobs:
            job = self._jobs.get((tok.name, plan.add_special_tokens, plan.text))
            if job is not None:  # being tokenized already: wait for it rather than do it twice
                await asyncio.shield(job)
                plan = tok.plan(plan.text, plan.add_special_tokens)
        await self._run(tok, plan)
        tok.finish(plan)
        return plan

    async def _run_head(self, tok: CachingTokenizer, plan: EncodePlan) -> None:
        """``tok.run_head``, in the worker thread when the piece is long; bad text is a 400."""
        try:
            if len(plan.head_piece or "") > self.cfg.offload_chars and self._executor is not None:
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, functools.partial(tok.run_head, plan))
            else:
                tok.run_head(plan)
        except TokenizationError as e:
            raise PromptError(400, str(e)) from None

    async def _run(self, tok: CachingTokenizer, plan: EncodePlan) -> None:
        """``tok.run``, in the worker thread when long; bad text is a 400."""
        pending = plan.pending
        try:
            if (sum(len(plan.chunks[i]) for i in pending) > self.cfg.offload_chars
                    and self._executor is not None):
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, functools.partial(tok.run, plan))
            else:
                tok.run(plan)
        except TokenizationError as e:
            raise PromptError(400, str(e)) from None
