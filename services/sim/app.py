"""The HTTP front of one simulated engine: vLLM's OpenAI API over aiohttp.

Bad input never reaches the engine: every body is checked by :mod:`.validation` and refused
with vLLM's error shape; anything unexpected becomes a 500 JSON error and is counted, and
the server keeps serving. Big prompts are tokenized off the event loop (as vLLM's async
tokenizer does), so one engine's /health, /metrics and running streams keep answering
while a megabyte of text is being tokenized.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from aiohttp import web
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, Counter, generate_latest

from infermesh.libs.telemetry import extract_context, get_logger, tracer, tracing_configured
from infermesh.libs.tokenization import (
    ChatTemplateError,
    IncrementalDetokenizer,
    TokenizationError,
)

from .encoding import to_json
from .engine import SimEngine, SimRequest
from .errors import (
    RequestError,
    error_body,
    invalid_request,
    json_invalid,
    model_not_found,
    parse_failure,
    stream_error_event,
    unsupported_media_type,
)
from .messages import materialize
from .metrics import EngineMetrics
from .nixl import (
    HEARTBEAT_PATH,
    PULL_PATH,
    IncompleteKVParams,
    KVHeartbeat,
    KVPull,
    KVPulled,
    RemotePrefill,
    remote_prefill,
    wants_remote_decode,
)
from .render import generation_defaults, render_body
from .requests import (
    MAX_N_SEQUENCES,
    ChatCompletionRequest,
    ChatCompletionToolsParam,
    CompletionRequest,
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
from .server_info import (
    EngineFacts,
    KvEventsFacts,
    ModelFacts,
    config_format,
    kv_event_sources,
    server_info,
    sglang_model_info,
    sglang_server_info,
)
from .streaming import ChatStream, CompletionStream
from .validation import decode_request, resolve_max_tokens

if TYPE_CHECKING:
    from .service import SimService

__all__ = ["OFFLOAD_MIN_BYTES", "EngineApp"]

_GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_TRACING = tracing_configured()  # OTEL_* ask for spans: a span per generation request

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

#: vLLM's answer on its render routes without ``--enable-scale-out``.
SCALE_OUT_DISABLED = ("Scale-out endpoints are disabled. Restart vllm serve with "
                      "--enable-scale-out to enable them.")
#: What vLLM answers when a request ends with finish reason "error" (a failed KV load under
#: kv_load_failure_policy "fail"): its GenerationError.
GENERATION_ERROR = "Internal server error"
EMPTY_CONVERSATION = ("Cannot apply chat template to an empty conversation. "
                      "Provide at least one message.")
#: What the tokenization library puts before a template's own error (vLLM shows it bare).
_TEMPLATE_ERROR_PREFIX = "chat template error: "

T = TypeVar("T")


def _error_response(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


def _json_response(value: Any) -> web.Response:
    return web.Response(body=to_json(value), content_type="application/json")


def _is_text_prompt(prompt: Any) -> bool:
    """A completion prompt given as text (one string, or a list of one), not token ids."""
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return isinstance(prompt, str)


def _refuse_beam_search(req: GenerationRequest) -> None:
    if req.use_beam_search:
        raise RequestError(400, "Beam search is not supported by the render endpoint")


def _refuse_prompt_embeds(req: CompletionRequest) -> None:
    """vLLM without ``--enable-prompt-embeds`` refuses ``prompt_embeds``, prompt or not."""
    if req.prompt_embeds is not None:
        raise invalid_request("You must set `--enable-prompt-embeds` to input `prompt_embeds`.",
                              "prompt_embeds")


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
        self.lora = engine.lora
        self.rng = random.Random(self.cfg.seed * 1000 + engine.index)
        self.stats = CollectorRegistry()
        self.rejected = Counter("infermesh_sim_rejected_requests", "Requests refused",
                                ["reason"], registry=self.stats)
        self.injected = Counter("infermesh_sim_injected_failures", "Injected errors",
                                ["code"], registry=self.stats)
        self.kv_params = Counter(
            "infermesh_sim_kv_transfer_params",
            "Requests carrying kv_transfer_params, by what the engine made of them",
            ["outcome"], registry=self.stats)
        self.fingerprint = system_fingerprint(self.served, str(engine.index))
        model_dir = Path(server.model_dir)
        #: the model's default sampling parameters (generation_config.json), for /render
        self.sampling_defaults = generation_defaults(model_dir)
        self.facts = self._facts(model_dir)

    def _facts(self, model_dir: Path) -> EngineFacts:
        """What /server_info and the SGLang-named endpoints report about this engine."""
        pub = self.engine.publisher
        kv = None if pub is None else KvEventsFacts(
            endpoint=pub.endpoint, replay_endpoint=pub.replay_endpoint,
            buffer_steps=pub.buffer_steps, hwm=pub.hwm, topic=pub.topic)
        cfg = self.cfg
        return EngineFacts(
            model_dir=str(model_dir), served_model_name=self.served,
            max_model_len=cfg.max_model_len, block_size=cfg.block_size,
            num_gpu_blocks=cfg.num_gpu_blocks, num_cpu_blocks=cfg.num_cpu_blocks,
            hash_algo=cfg.hash_algo, max_num_seqs=cfg.max_num_seqs, seed=cfg.seed,
            max_loras=cfg.max_loras, lora_names=tuple(self.lora.paths),
            instance_id=f"{time.time_ns()}", model=ModelFacts.from_folder(model_dir),
            kv_events=kv)

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(client_max_size=self.cfg.max_body_bytes,
                              middlewares=[self._traced, self._errors])
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
        r.add_get("/server_info", self.server_info)
        r.add_get("/kv_event_sources", self.kv_event_sources)
        r.add_post("/v1/completions/render", self.completions_render)
        r.add_post("/v1/chat/completions/render", self.chat_render)
        if self.cfg.sglang_info:
            # SGLang's names (vLLM 0.32 answers 404): what peer routers probe workers for.
            r.add_get("/get_server_info", self.sglang_server_info)
            r.add_get("/model_info", self.sglang_model_info)
            r.add_get("/get_model_info", self.sglang_model_info)
        if self.lora.enabled and self.cfg.runtime_lora_updating:
            # vLLM attaches these only with VLLM_ALLOW_RUNTIME_LORA_UPDATING.
            r.add_post("/v1/load_lora_adapter", self.load_lora_adapter)
            r.add_post("/v1/unload_lora_adapter", self.unload_lora_adapter)
        r.add_get("/sim/cache", self.sim_cache)
        r.add_get("/sim/metrics", self.sim_metrics)
        if self.cfg.kv_connector:
            r.add_post(PULL_PATH, self.kv_transfer)
            r.add_post(HEARTBEAT_PATH, self.kv_heartbeat)
        return app

    @web.middleware
    async def _traced(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """A generation request continues its caller's trace (``traceparent``) with a span
        of its own, as vLLM does with ``--otlp-traces-endpoint`` (its span name)."""
        if not _TRACING or request.method != "POST" or request.path not in _GENERATION_PATHS:
            return await handler(request)  # type: ignore[no-any-return]
        with tracer().start_as_current_span(
                "llm_request", context=extract_context(dict(request.headers)),
                kind=SpanKind.SERVER) as span:
            resp: web.StreamResponse = await handler(request)
            if span.is_recording():
                span.set_attributes({"http.response.status_code": resp.status,
                                     "gen_ai.request.id": request.headers.get(
                                         "X-Request-Id", "")})
            return resp

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except RequestError as e:
            self.rejected.labels("invalid").inc()
            return _error_response(e.status, e.body())
        except TokenizationError as e:
            self.rejected.labels("invalid").inc()
            message = str(e)
            if isinstance(e, ChatTemplateError):
                message = message.removeprefix(_TEMPLATE_ERROR_PREFIX)
            return _error_response(400, error_body(message, "BadRequestError", 400))
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
                  for name, path in self.lora.paths.items()]
        return web.Response(body=models_response(cards), content_type="application/json")

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        """``POST /v1/load_lora_adapter`` ``{lora_name, lora_path, load_inplace}``: register an
        adapter on this engine; 200 with vLLM's text, or vLLM's 400/404."""
        body = await self._json_object(request)
        text = self.lora.load(str(body.get("lora_name") or ""), str(body.get("lora_path") or ""),
                              inplace=bool(body.get("load_inplace")), base=self.served)
        log.info("lora_loaded", engine=self.engine.index, name=body.get("lora_name"))
        return web.Response(text=text)

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        """``POST /v1/unload_lora_adapter`` ``{lora_name}``: forget an adapter on this engine."""
        body = await self._json_object(request)
        text = self.lora.unload(str(body.get("lora_name") or ""))
        log.info("lora_unloaded", engine=self.engine.index, name=body.get("lora_name"))
        return web.Response(text=text)

    async def _json_object(self, request: web.Request) -> dict[str, Any]:
        """The request's JSON object body, or vLLM's 400 for anything else."""
        if request.content_type != "application/json":
            raise unsupported_media_type()
        try:
            body = json.loads(await request.read())
        except json.JSONDecodeError as exc:
            raise json_invalid(exc.pos, exc.msg) from None
        except ValueError:
            raise parse_failure() from None
        if not isinstance(body, dict):
            raise invalid_request("The body must be a JSON object")
        return body

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
            "leased": len(self.engine.leases),
            "fetching": len(self.engine.fetching),
            **({"storage": self.engine.storage.describe()} if self.engine.storage else {}),
        }
        return web.json_response(body)

    async def reset_prefix_cache(self, _: web.Request) -> web.Response:
        """``POST /reset_prefix_cache``: 200 even when refused, as vLLM."""
        ok = self.engine.reset_prefix_cache()
        if not ok:
            log.warning("reset_prefix_cache_refused", engine=self.engine.index)
        return web.Response(status=200)

    async def kv_transfer(self, request: web.Request) -> web.Response:
        """``POST /sim/kv_transfer/{remote_request_id}``: a decode engine reads the blocks
        this engine holds for that request, which are released (NIXL's read and its
        completion notification in one). 410 when no lease is held (expired or unknown),
        409 when the reader names another engine or other blocks."""
        rid = request.match_info["remote_request_id"]
        try:
            pull = msgspec.json.decode(await request.read(), type=KVPull)
        except msgspec.DecodeError as e:  # ValidationError is a DecodeError
            self.rejected.labels("kv_transfer").inc()
            return _error_response(400, error_body(str(e), "BadRequestError", 400))
        try:
            got = self.engine.read_held(rid, pull.engine_id, pull.block_ids)
        except ValueError as e:
            return _error_response(409, error_body(str(e), "ConflictError", 409))
        if got is None:
            return _error_response(410, error_body(
                f"No KV blocks are held for request {rid} (expired or unknown)",
                "GoneError", 410))
        return _json_response(KVPulled(rid, got[0], got[1]))

    async def kv_heartbeat(self, request: web.Request) -> web.Response:
        """``POST /sim/kv_heartbeat``: a decode engine still wants these leases."""
        try:
            beat = msgspec.json.decode(await request.read(), type=KVHeartbeat)
        except msgspec.DecodeError as e:
            self.rejected.labels("kv_heartbeat").inc()
            return _error_response(400, error_body(str(e), "BadRequestError", 400))
        return _json_response({"extended": self.engine.extend_leases(beat.engine_id,
                                                                     beat.request_ids)})

    async def server_info(self, request: web.Request) -> web.Response:
        """``GET /server_info[?config_format=text|json]``: vLLM's config, env and system
        (vLLM serves it with ``VLLM_SERVER_DEV_MODE=1``, as infermesh runs it)."""
        fmt = config_format(request.query.get("config_format"))
        return _json_response(server_info(self.facts, fmt))

    async def kv_event_sources(self, _: web.Request) -> web.Response:
        """``GET /kv_event_sources``: this engine's KV-event publisher, as rank 0."""
        return _json_response(kv_event_sources(self.facts))

    async def sglang_server_info(self, _: web.Request) -> web.Response:
        """``GET /get_server_info``: SGLang's name (not served by vLLM 0.32) for peer
        routers: model, block size, parallelism."""
        return _json_response(sglang_server_info(self.facts))

    async def sglang_model_info(self, _: web.Request) -> web.Response:
        """``GET /model_info``, ``GET /get_model_info``: SGLang's names (not served by
        vLLM 0.32) for peer routers: model path, type, architectures."""
        return _json_response(sglang_model_info(self.facts))

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
        if not messages:
            raise RequestError(400, EMPTY_CONVERSATION)
        text = await self._call(big, self.tok.render_chat, materialize(messages), **template)
        return await self._encode(big, text, add_special_tokens)

    async def _chat_ids(self, big: bool, req: ChatCompletionRequest) -> list[int]:
        """The prompt ids of a chat completion request."""
        return await self._encode_chat(
            big, req.messages, add_special_tokens=req.add_special_tokens,
            add_generation_prompt=req.add_generation_prompt, tools=_tool_dicts(req.tools),
            chat_template_kwargs=req.chat_template_kwargs,
            continue_final_message=req.continue_final_message, documents=req.documents,
            chat_template=req.chat_template)

    def _checked_len(self, ids: list[int], text: bool) -> int:
        """The prompt length vLLM checks: a text prompt is tokenized with truncation to
        ``max_model_len + 1`` tokens, so longer ones count as that ("at least")."""
        return min(len(ids), self.cfg.max_model_len + 1) if text else len(ids)

    # ------------------------------------------------------------------ generation

    def _check_model(self, model: str | None) -> str | None:
        """The LoRA adapter the request names (None for the base model); 404 when unknown."""
        if model is None or model == self.served:
            return None
        if self.lora.enabled and self.lora.resolve(model):
            return model
        # vLLM names the base model only (its "aliases"), not the adapters.
        raise model_not_found(model, [self.served])

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
        remote = self._remote_prefill(req.kv_transfer_params)
        with self._releasing_on_refusal(remote):
            lora = self._check_model(req.model)
            _refuse_prompt_embeds(req)
            big = len(raw) >= OFFLOAD_MIN_BYTES
            ids = await self._prompt_ids(big, req.prompt, req.add_special_tokens)
        return await self._generate(request, req, ids, lora, big, remote,
                                    text_prompt=_is_text_prompt(req.prompt))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``."""
        raw = await request.read()
        req = decode_request(raw, "chat", content_type=request.content_type,
                             max_model_len=self.cfg.max_model_len,
                             check_model=self._check_model)
        remote = self._remote_prefill(req.kv_transfer_params)
        with self._releasing_on_refusal(remote):
            lora = self._check_model(req.model)
            big = len(raw) >= OFFLOAD_MIN_BYTES
            ids = await self._chat_ids(big, req)
            if req.max_tokens is None and req.max_completion_tokens is None:
                # vLLM would fill the context; a random model never stops, so cap it.
                req.max_completion_tokens = self.cfg.chat_default_max_tokens
        return await self._generate(request, req, ids, lora, big, remote)

    # ------------------------------------------------------------------ render (scale-out)

    def _check_scale_out(self) -> None:
        if not self.cfg.enable_scale_out:
            raise RequestError(403, SCALE_OUT_DISABLED, "PermissionDeniedError")

    async def completions_render(self, request: web.Request) -> web.Response:
        """``POST /v1/completions/render``: the engine input of each prompt (a list of
        vLLM's ``GenerateRequest``), checked as ``/v1/completions`` checks it."""
        self._check_scale_out()
        raw = await request.read()
        req = decode_request(raw, "completion", content_type=request.content_type,
                             max_model_len=self.cfg.max_model_len, max_n=MAX_N_SEQUENCES,
                             check_model=self._check_model)
        _refuse_beam_search(req)
        _refuse_prompt_embeds(req)
        prompts, lens = await self._render_prompts(len(raw) >= OFFLOAD_MIN_BYTES, req)
        rid = response_id("completion", req, request.headers.get("X-Request-Id"))
        return web.Response(body=render_body(rid, prompts, req, self.cfg.max_model_len,
                                             self.sampling_defaults, lens),
                            content_type="application/json")

    async def chat_render(self, request: web.Request) -> web.Response:
        """``POST /v1/chat/completions/render``: the engine input of a chat request (one
        ``GenerateRequest``), checked as ``/v1/chat/completions`` checks it."""
        self._check_scale_out()
        raw = await request.read()
        req = decode_request(raw, "chat", content_type=request.content_type,
                             max_model_len=self.cfg.max_model_len, max_n=MAX_N_SEQUENCES,
                             check_model=self._check_model)
        _refuse_beam_search(req)
        ids = await self._chat_ids(len(raw) >= OFFLOAD_MIN_BYTES, req)
        rid = response_id("chat", req, request.headers.get("X-Request-Id"))
        return web.Response(body=render_body(rid, [ids], req, self.cfg.max_model_len,
                                             self.sampling_defaults,
                                             [self._checked_len(ids, True)]),
                            content_type="application/json")

    async def _render_prompts(self, big: bool,
                              req: CompletionRequest) -> tuple[list[list[int]], list[int]]:
        """Every prompt of a completion request as ids, with the lengths vLLM checks.

        Unlike generation, a batch of prompts is served; token ids are taken as given
        (vLLM's render does not check them against the vocabulary).
        """
        prompt = req.prompt
        if isinstance(prompt, str) or (prompt and all(type(t) is int for t in prompt)):
            items: list[Any] = [prompt]
        else:
            items = list(prompt or [])
        if not items:
            raise RequestError(400, "You must pass at least one prompt")
        prompts: list[list[int]] = []
        lens: list[int] = []
        for item in items:
            text = isinstance(item, str)
            ids = await self._encode(big, item, req.add_special_tokens) if text else list(item)
            prompts.append(ids)
            lens.append(self._checked_len(ids, text))
        return prompts, lens

    @contextlib.contextmanager
    def _releasing_on_refusal(self, remote: RemotePrefill | None) -> Iterator[None]:
        """A decode refused before it reaches the engine frees its prefill's blocks, as
        vLLM notifies its connector of a rejected request."""
        try:
            yield
        except (RequestError, TokenizationError):
            if remote is not None:
                self.engine.release_remote(remote)
            raise

    async def _generate(self, request: web.Request, req: GenerationRequest, ids: list[int],
                        lora: str | None, big: bool, remote: RemotePrefill | None, *,
                        text_prompt: bool = True) -> web.StreamResponse:
        """Run one checked request on the engine; stream it or answer with one body."""
        chat = isinstance(req, ChatCompletionRequest)
        with self._releasing_on_refusal(remote):
            max_tokens = resolve_max_tokens(req, self._checked_len(ids, text_prompt),
                                            self.cfg.max_model_len)
        failed = self._inject_failure()
        if failed is not None:
            if remote is not None:  # never reached the engine: free the prefill's blocks
                self.engine.release_remote(remote)
            return failed
        rid = response_id("chat" if chat else "completion", req,
                          request.headers.get("X-Request-Id"))
        sreq = SimRequest(
            request_id=rid, prompt_ids=ids, max_tokens=max_tokens, lora_name=lora,
            cache_salt=req.cache_salt, seed=req.seed,
            stop_token_ids=frozenset(req.stop_token_ids or ()),
            remote_decode=self.cfg.kv_connector and wants_remote_decode(req.kv_transfer_params),
            remote_prefill=remote,
        )
        # Hashing the prompt's blocks and priming the detokenizer also scale with the
        # prompt; for a big one both run off the loop too.
        if lora is not None:
            # Fixed now: the blocks hash with it, and an unload from here on does not touch it.
            sreq.lora_path = self.lora.path(lora)
            if sreq.lora_path is None:  # unloaded while the prompt was tokenized
                with self._releasing_on_refusal(remote):
                    raise model_not_found(lora, [self.served])
            sreq.lora_id = self.lora.ids[lora]
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
        if reason == "error":
            return _error_response(500, error_body(GENERATION_ERROR, "InternalServerError",
                                                   500))
        build = chat_completion_response if chat else completion_response
        body = build(rid, model, text, prompt_tokens=len(ids), completion_tokens=used,
                     finish_reason=reason, stop_reason=stop_reason,
                     cached_tokens=self._cached(sreq), system_fingerprint=self.fingerprint,
                     kv_transfer_params=sreq.kv_params)
        return web.Response(body=body, content_type="application/json")

    def _remote_prefill(self, params: dict[str, Any] | None) -> RemotePrefill | None:
        """The remote prefill a request's ``kv_transfer_params`` names, if this engine has a
        connector and the params name one; counted by what they turned out to be."""
        if params is None:
            return None
        if not self.cfg.kv_connector:
            self.kv_params.labels("ignored").inc()  # vLLM without a connector
            return None
        if wants_remote_decode(params):
            self.kv_params.labels("remote_decode").inc()
            return None
        try:
            remote = remote_prefill(params)
        except IncompleteKVParams as e:
            self.kv_params.labels("incomplete").inc()
            log.warning("kv_transfer_params_invalid", engine=self.engine.index, reason=str(e),
                        msg="Got invalid KVTransferParams; this request will not use KV "
                        "transfer")
            return None
        if remote is None:
            self.kv_params.labels("none").inc()
        else:
            self.kv_params.labels("unusable" if remote.problem else "remote_prefill").inc()
        return remote

    def _cached(self, sreq: SimRequest) -> int | None:
        if not self.cfg.enable_prompt_tokens_details:
            return None
        return self.engine.reported_cached(sreq)

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
                    elif reason == "error":
                        # vLLM's GenerationError mid-stream: the error event, no usage, [DONE]
                        await resp.write(stream_error_event(GENERATION_ERROR))
                        await resp.write(stream.done())
                        return resp
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
