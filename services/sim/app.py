"""The HTTP front of one simulated engine: vLLM's OpenAI API over aiohttp.

Bad input never reaches the engine: every body is checked by :mod:`.validation` and refused
with vLLM's error shape; anything unexpected becomes a 500 JSON error and is counted, and
the server keeps serving. Big prompts are tokenized off the event loop (as vLLM's async
tokenizer does), so one engine's /health, /metrics and running streams keep answering
while a megabyte of text is being tokenized.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest

from infermesh.libs.telemetry import get_logger
from infermesh.libs.tokenization import IncrementalDetokenizer, TokenizationError

from .engine import SimEngine, SimRequest
from .errors import RequestError, error_body, model_not_found, stream_error_event
from .messages import materialize
from .metrics import EngineMetrics
from .requests import (
    ChatCompletionRequest,
    ChatCompletionToolsParam,
    GenerationRequest,
    TokenizeChatRequest,
)
from .responses import (
    chat_completion_response,
    completion_response,
    detokenize_response,
    model_card,
    models_response,
    response_id,
    system_fingerprint,
    tokenize_response,
    version_response,
)
from .streaming import ChatStream, CompletionStream
from .validation import decode_request, resolve_max_tokens

if TYPE_CHECKING:
    from .service import SimService

__all__ = ["OFFLOAD_MIN_BYTES", "EngineApp"]

log = get_logger("sim.api")

#: Request bodies at least this big are tokenized (and their prompts hashed) in a worker
#: thread; smaller ones cost less than the hand-off (~8 KiB of text tokenizes in ~6 ms).
OFFLOAD_MIN_BYTES = 8192

_ERROR_TYPES = {
    400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
    404: "NotFoundError", 408: "RequestTimeoutError", 429: "RateLimitError",
    500: "InternalServerError", 502: "BadGatewayError", 503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}

T = TypeVar("T")


def _error_response(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


def _tool_dicts(tools: list[ChatCompletionToolsParam] | None) -> list[dict[str, Any]] | None:
    """Tools as vLLM hands them to the chat template (each tool's ``model_dump()``)."""
    return None if tools is None else [t.model_dump() for t in tools]


class EngineApp:
    """The HTTP front of one simulated engine."""

    def __init__(self, server: SimService, engine: SimEngine, metrics: EngineMetrics) -> None:
        self.s = server
        self.cfg = server.cfg
        self.engine = engine
        self.metrics = metrics
        self.tok = server.tokenizer
        self.served = server.served_model_name
        self.loras = self.cfg.lora_paths()
        self.rng = random.Random(self.cfg.seed * 1000 + engine.index)
        self.stats = CollectorRegistry()
        self.rejected = Counter("infermesh_sim_rejected_requests", "Requests refused",
                                ["reason"], registry=self.stats)
        self.injected = Counter("infermesh_sim_injected_failures", "Injected errors",
                                ["code"], registry=self.stats)
        self.fingerprint = system_fingerprint(self.served, str(engine.index))

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(client_max_size=self.cfg.max_body_bytes,
                              middlewares=[self._errors])
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/version", self.version)
        r.add_get("/v1/models", self.models)
        r.add_get("/metrics", self.get_metrics)
        r.add_post("/tokenize", self.tokenize)
        r.add_post("/detokenize", self.detokenize)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        r.add_get("/sim/cache", self.sim_cache)
        r.add_get("/sim/metrics", self.sim_metrics)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except RequestError as e:
            self.rejected.labels("invalid").inc()
            return _error_response(e.status, e.body())
        except TokenizationError as e:
            self.rejected.labels("invalid").inc()
            return _error_response(400, error_body(str(e), "BadRequestError", 400))
        except web.HTTPRequestEntityTooLarge as e:
            self.rejected.labels("too_large").inc()
            return _error_response(413, error_body(e.text or "body too large",
                                                     "BadRequestError", 413))
        except web.HTTPException as e:
            if e.status >= 400:
                self.rejected.labels(str(e.status)).inc()
                return _error_response(e.status, error_body(e.reason, _ERROR_TYPES.get(
                    e.status, "BadRequestError"), e.status))
            raise
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:
            self.rejected.labels("internal").inc()
            log.exception("handler_failed", path=request.path)
            return _error_response(500, error_body(f"{type(e).__name__}: {e}",
                                                     "InternalServerError", 500))

    # ------------------------------------------------------------------ simple endpoints

    async def health(self, _: web.Request) -> web.Response:
        """``GET /health``: 200, empty."""
        return web.Response(status=200)

    async def version(self, _: web.Request) -> web.Response:
        """``GET /version``."""
        return web.Response(body=version_response(), content_type="application/json")

    async def models(self, _: web.Request) -> web.Response:
        """``GET /v1/models``: the served model, then its LoRA adapters."""
        cards = [model_card(self.served, root=str(self.s.model_dir),
                            max_model_len=self.cfg.max_model_len)]
        cards += [model_card(name, root=path, parent=self.served)
                  for name, path in self.loras.items()]
        return web.Response(body=models_response(cards), content_type="application/json")

    async def get_metrics(self, request: web.Request) -> web.Response:
        """``GET /metrics``: this engine's ``vllm:*`` families."""
        body, ctype = self.metrics.render_for(request.headers.get("Accept"))
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = ctype
        return resp

    async def sim_metrics(self, _: web.Request) -> web.Response:
        """``GET /sim/metrics``: the simulator's own counters (refusals, injected failures)."""
        return web.Response(body=generate_latest(self.stats), content_type="text/plain")

    async def sim_cache(self, _: web.Request) -> web.Response:
        """Debug: the blocks this engine holds, as its KV events name them."""
        c = self.engine.cache
        body = {
            **self.engine.cache_contents(),
            "block_size": c.block_size,
            "capacity": c.capacity,
            "used": c.used,
            "next_seq": self.engine.publisher.next_seq if self.engine.publisher else None,
            "running": len(self.engine.running),
            "waiting": len(self.engine.waiting),
        }
        return web.json_response(body)

    async def reset_prefix_cache(self, _: web.Request) -> web.Response:
        """``POST /reset_prefix_cache``: 200 even when refused, as vLLM."""
        ok = self.engine.reset_prefix_cache()
        if not ok:
            log.warning("reset_prefix_cache_refused", engine=self.engine.index)
        return web.Response(status=200)

    async def tokenize(self, request: web.Request) -> web.Response:
        """``POST /tokenize``: a prompt or chat messages to token ids."""
        raw = await request.read()
        req = decode_request(raw, "tokenize", content_type=request.content_type,
                             max_model_len=self.cfg.max_model_len,
                             check_model=self._check_model)
        big = len(raw) >= OFFLOAD_MIN_BYTES
        if isinstance(req, TokenizeChatRequest):
            ids = await self._encode_chat(
                big, req.messages, add_special_tokens=req.add_special_tokens,
                add_generation_prompt=req.add_generation_prompt, tools=_tool_dicts(req.tools),
                chat_template_kwargs=req.chat_template_kwargs,
                continue_final_message=req.continue_final_message,
                chat_template=req.chat_template)
        else:
            ids = await self._encode(big, req.prompt, req.add_special_tokens)
        strs = [self.tok.id_to_token(i) or "" for i in ids] if req.return_token_strs else None
        return web.Response(body=tokenize_response(ids, self.cfg.max_model_len, strs),
                            content_type="application/json")

    async def detokenize(self, request: web.Request) -> web.Response:
        """``POST /detokenize``."""
        req = decode_request(await request.read(), "detokenize",
                             content_type=request.content_type,
                             max_model_len=self.cfg.max_model_len,
                             check_model=self._check_model)
        return web.Response(body=detokenize_response(self.tok.decode(req.tokens)),
                            content_type="application/json")

    # ------------------------------------------------------------------ tokenization

    @staticmethod
    async def _call(big: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(...)``, in a worker thread for a big request so the loop keeps serving."""
        if big:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    async def _encode(self, big: bool, text: str, add_special_tokens: bool) -> list[int]:
        if not big:
            return self.tok.encode(text, add_special_tokens=add_special_tokens)
        # tokenizers' encode() holds the GIL for the whole call, so in a thread it would
        # still stall the loop; encode_batch() releases it while the Rust side works.
        batch = await asyncio.to_thread(self.tok.encode_batch, [text], add_special_tokens)
        return batch[0]

    async def _encode_chat(self, big: bool, messages: list[Any], *, add_special_tokens: bool,
                           **template: Any) -> list[int]:
        """The prompt ids of chat ``messages`` (rendered with ``template`` options)."""
        text = await self._call(big, self.tok.render_chat, materialize(messages), **template)
        return await self._encode(big, text, add_special_tokens)

    # ------------------------------------------------------------------ generation

    def _check_model(self, model: str | None) -> str | None:
        """The LoRA adapter the request names (None for the base model); 404 when unknown."""
        if model is None or model == self.served:
            return None
        if model in self.loras:
            return model
        raise model_not_found(model, [self.served, *self.loras])

    def _inject_failure(self) -> web.Response | None:
        if self.cfg.failure_rate and self.rng.random() < self.cfg.failure_rate:
            code = self.rng.choice(self.cfg.failure_codes)
            self.injected.labels(str(code)).inc()
            etype = _ERROR_TYPES.get(code, "InternalServerError")
            return _error_response(code, error_body(
                f"Injected failure (simulated {code})", etype, code))
        return None

    async def _prompt_ids(self, big: bool, prompt: Any, add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return await self._encode(big, prompt, add_special_tokens)
        if isinstance(prompt, list) and all(type(t) is int for t in prompt):
            vocab = self.tok.vocab_size
            for t in prompt:
                if not 0 <= t < vocab:
                    raise RequestError(400, f"Token id {t} is out of vocabulary",
                                       "BadRequestError", "prompt")
            return list(prompt)
        raise RequestError(400, "The simulator serves one prompt per request; send a string "
                           "or one list of token ids.", "BadRequestError", "prompt")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/completions``."""
        raw = await request.read()
        req = decode_request(raw, "completion", content_type=request.content_type,
                             max_model_len=self.cfg.max_model_len,
                             check_model=self._check_model)
        lora = self._check_model(req.model)
        if req.prompt is None:  # prompt_embeds only (vLLM without --enable-prompt-embeds)
            raise RequestError(
                400, "You must set `--enable-prompt-embeds` to input `prompt_embeds`.")
        big = len(raw) >= OFFLOAD_MIN_BYTES
        ids = await self._prompt_ids(big, req.prompt, req.add_special_tokens)
        return await self._generate(request, req, ids, lora, big)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``."""
        raw = await request.read()
        req = decode_request(raw, "chat", content_type=request.content_type,
                             max_model_len=self.cfg.max_model_len,
                             check_model=self._check_model)
        lora = self._check_model(req.model)
        big = len(raw) >= OFFLOAD_MIN_BYTES
        ids = await self._encode_chat(
            big, req.messages, add_special_tokens=req.add_special_tokens,
            add_generation_prompt=req.add_generation_prompt, tools=_tool_dicts(req.tools),
            chat_template_kwargs=req.chat_template_kwargs,
            continue_final_message=req.continue_final_message, documents=req.documents,
            chat_template=req.chat_template)
        if req.max_tokens is None and req.max_completion_tokens is None:
            # vLLM would fill the context; a random model never stops, so cap it.
            req.max_completion_tokens = self.cfg.chat_default_max_tokens
        return await self._generate(request, req, ids, lora, big)

    async def _generate(self, request: web.Request, req: GenerationRequest, ids: list[int],
                        lora: str | None, big: bool) -> web.StreamResponse:
        """Run one checked request on the engine; stream it or answer with one body."""
        chat = isinstance(req, ChatCompletionRequest)
        max_tokens = resolve_max_tokens(req, len(ids), self.cfg.max_model_len)
        failed = self._inject_failure()
        if failed is not None:
            return failed
        rid = response_id("chat" if chat else "completion", req,
                          request.headers.get("X-Request-Id"))
        sreq = SimRequest(
            request_id=rid, prompt_ids=ids, max_tokens=max_tokens, lora_name=lora,
            cache_salt=req.cache_salt, seed=req.seed,
            stop_token_ids=frozenset(req.stop_token_ids or ()),
        )
        # Hashing the prompt's blocks and priming the detokenizer also scale with the
        # prompt; for a big one both run off the loop too.
        sreq.hashes = await self._call(big, self.engine.prompt_hashes, sreq)
        detok = await self._call(big, self.tok.detokenizer, ids)
        self.engine.submit(sreq)
        model = req.model or self.served
        if req.stream:
            stream_cls = ChatStream if chat else CompletionStream
            stream = stream_cls.for_request(req, rid, model, prompt_tokens=len(ids),
                                            system_fingerprint=self.fingerprint)
            return await self._stream(request, sreq, detok, stream, req, chat=chat)
        text, reason, stop_reason, used = await self._collect(sreq, detok, req)
        build = chat_completion_response if chat else completion_response
        body = build(rid, model, text, prompt_tokens=len(ids), completion_tokens=used,
                     finish_reason=reason, stop_reason=stop_reason,
                     cached_tokens=self._cached(sreq), system_fingerprint=self.fingerprint)
        return web.Response(body=body, content_type="application/json")

    def _cached(self, sreq: SimRequest) -> int | None:
        return sreq.cached_tokens if self.cfg.enable_prompt_tokens_details else None

    @staticmethod
    def _stops(req: GenerationRequest) -> list[str]:
        return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])

    async def _collect(self, sreq: SimRequest, detok: IncrementalDetokenizer,
                       req: GenerationRequest) -> tuple[str, str, str | int | None, int]:
        """Wait for a non-streamed request: (text, finish reason, stop reason, tokens used).

        Stop strings are checked as tokens arrive, as vLLM does, so a match ends the request
        there instead of generating to max_tokens.
        """
        stops = self._stops(req)
        text = ""
        used = 0
        reason: str | None = None
        stop_reason: str | int | None = None
        try:
            while reason is None:
                tok, reason = await sreq.out.get()
                if tok is None:
                    break
                used += 1
                before = len(text)
                text += detok.step(tok)
                for s in stops:
                    at = text.find(s, max(0, before - len(s) + 1))
                    if at >= 0:
                        text = text[: at + (len(s) if req.include_stop_str_in_output else 0)]
                        reason, stop_reason = "stop", s
                        self.engine.finish_stop(sreq)
                        break
                if reason == "stop" and stop_reason is None:
                    stop_reason = tok
        except asyncio.CancelledError:  # the client went away: free the blocks now
            self.engine.abort(sreq)
            raise
        if reason == "abort":
            raise RequestError(503, "The request could not be scheduled: it does not fit the "
                               "KV cache", "ServiceUnavailableError")
        assert reason is not None
        return text, reason, stop_reason, used

    async def _stream(self, request: web.Request, sreq: SimRequest,
                      detok: IncrementalDetokenizer, stream: Any, req: GenerationRequest,
                      chat: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        stops = self._stops(req)
        text_so_far = ""
        try:
            await resp.prepare(request)  # inside: a client gone already still frees its blocks
            if chat:
                await resp.write(stream.first())
            while True:
                tok, reason = await sreq.out.get()
                if tok is None:
                    if reason == "abort":
                        await resp.write(stream_error_event(
                            "The request could not be scheduled", "ServiceUnavailableError", 503))
                    break
                delta = detok.step(tok)
                stop_reason: str | int | None = None
                if stops and delta:
                    before = len(text_so_far)
                    text_so_far += delta
                    for s in stops:
                        at = text_so_far.find(s, max(0, before - len(s) + 1))
                        if at >= 0:
                            cut = at + (len(s) if req.include_stop_str_in_output else 0)
                            delta = text_so_far[before:cut] if cut > before else ""
                            reason, stop_reason = "stop", s
                            self.engine.finish_stop(sreq)
                            break
                if reason == "stop" and stop_reason is None:
                    stop_reason = tok
                await resp.write(stream.chunk(delta, finish_reason=reason,
                                              stop_reason=stop_reason))
                if reason is not None:
                    break
            if stream.include_usage:
                await resp.write(stream.usage(self._cached(sreq)))
            await resp.write(stream.done())
        except (ConnectionResetError, asyncio.CancelledError):
            self.engine.abort(sreq)
            raise
        return resp
