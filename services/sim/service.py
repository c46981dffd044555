"""The simulator's HTTP side: one aiohttp server per engine, vLLM's OpenAI API on each.

Bad input never reaches the engine: every body is decoded and checked by ``protocol`` and answered
with vLLM's error shape; anything unexpected becomes a 500 JSON error and is counted, and the
server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest

from infermesh.libs.telemetry import get_logger
from infermesh.libs.tokenization import ModelTokenizer, TokenizationError

from . import protocol as P
from .config import SimConfig
from .engine import SimEngine, SimRequest, sampling_vocab
from .metrics import EngineMetrics, vllm_cache_config_labels
from .publisher import ZmqKVPublisher

log = get_logger("sim.server")

_ERROR_TYPES = {
    400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
    404: "NotFoundError", 408: "RequestTimeoutError", 429: "RateLimitError",
    500: "InternalServerError", 502: "BadGatewayError", 503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def _error_response(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


@dataclass
class EngineEndpoints:
    """Where one engine serves."""

    index: int
    http: str
    kv: str
    replay: str
    topic: str


class EngineApp:
    """The HTTP front of one simulated engine."""

    def __init__(self, server: SimServer, engine: SimEngine, metrics: EngineMetrics) -> None:
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
        self.fingerprint = P.system_fingerprint(self.served, str(engine.index))

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
        except P.RequestError as e:
            self.rejected.labels("invalid").inc()
            return _error_response(e.status, e.body())
        except TokenizationError as e:
            self.rejected.labels("invalid").inc()
            return _error_response(400, P.error_body(str(e), "BadRequestError", 400))
        except web.HTTPRequestEntityTooLarge as e:
            self.rejected.labels("too_large").inc()
            return _error_response(413, P.error_body(e.text or "body too large",
                                                     "BadRequestError", 413))
        except web.HTTPException as e:
            if e.status >= 400:
                self.rejected.labels(str(e.status)).inc()
                return _error_response(e.status, P.error_body(e.reason, _ERROR_TYPES.get(
                    e.status, "BadRequestError"), e.status))
            raise
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:
            self.rejected.labels("internal").inc()
            log.exception("handler_failed", path=request.path)
            return _error_response(500, P.error_body(f"{type(e).__name__}: {e}",
                                                     "InternalServerError", 500))

    # ------------------------------------------------------------------ simple endpoints

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, _: web.Request) -> web.Response:
        return web.Response(body=P.version_response(), content_type="application/json")

    async def models(self, _: web.Request) -> web.Response:
        cards = [P.model_card(self.served, root=str(self.s.model_dir),
                              max_model_len=self.cfg.max_model_len)]
        cards += [P.model_card(name, root=path, parent=self.served)
                  for name, path in self.loras.items()]
        return web.Response(body=P.models_response(cards), content_type="application/json")

    async def get_metrics(self, request: web.Request) -> web.Response:
        body, ctype = self.metrics.render_for(request.headers.get("Accept"))
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = ctype
        return resp

    async def sim_metrics(self, _: web.Request) -> web.Response:
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
        ok = self.engine.reset_prefix_cache()
        if not ok:
            log.warning("reset_prefix_cache_refused", engine=self.engine.index)
        return web.Response(status=200)

    async def tokenize(self, request: web.Request) -> web.Response:
        req = P.decode_request(await request.read(), "tokenize",
                               content_type=request.content_type,
                               max_model_len=self.cfg.max_model_len)
        self._check_model(req.model)
        if isinstance(req, P.TokenizeChatRequest):
            ids = self.tok.encode_chat(
                req.messages, add_generation_prompt=req.add_generation_prompt,
                tools=req.tools, chat_template_kwargs=req.chat_template_kwargs,
                continue_final_message=req.continue_final_message,
                chat_template=req.chat_template, add_special_tokens=req.add_special_tokens)
        else:
            ids = self.tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        strs = [self.tok.id_to_token(i) or "" for i in ids] if req.return_token_strs else None
        return web.Response(body=P.tokenize_response(ids, self.cfg.max_model_len, strs),
                            content_type="application/json")

    async def detokenize(self, request: web.Request) -> web.Response:
        req = P.decode_request(await request.read(), "detokenize",
                               content_type=request.content_type,
                               max_model_len=self.cfg.max_model_len)
        self._check_model(req.model)
        return web.Response(body=P.detokenize_response(self.tok.decode(req.tokens)),
                            content_type="application/json")

    # ------------------------------------------------------------------ generation

    def _check_model(self, model: str | None) -> str | None:
        """The LoRA adapter the request names (None for the base model); 404 when unknown."""
        if model is None or model == self.served:
            return None
        if model in self.loras:
            return model
        raise P.model_not_found(model, [self.served, *self.loras])

    def _inject_failure(self) -> web.Response | None:
        if self.cfg.failure_rate and self.rng.random() < self.cfg.failure_rate:
            code = self.rng.choice(self.cfg.failure_codes)
            self.injected.labels(str(code)).inc()
            etype = _ERROR_TYPES.get(code, "InternalServerError")
            return _error_response(code, P.error_body(
                f"Injected failure (simulated {code})", etype, code))
        return None

    def _prompt_ids(self, prompt: Any, add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tok.encode(prompt, add_special_tokens=add_special_tokens)
        if isinstance(prompt, list) and all(type(t) is int for t in prompt):
            vocab = self.tok.vocab_size
            for t in prompt:
                if not 0 <= t < vocab:
                    raise P.RequestError(400, f"Token id {t} is out of vocabulary",
                                         "BadRequestError", "prompt")
            return list(prompt)
        raise P.RequestError(400, "The simulator serves one prompt per request; send a string "
                             "or one list of token ids.", "BadRequestError", "prompt")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = P.decode_request(await request.read(), "completion",
                               content_type=request.content_type,
                               max_model_len=self.cfg.max_model_len)
        lora = self._check_model(req.model)
        if req.prompt is None:
            raise P.RequestError(400, "prompt is required", "BadRequestError", "prompt")
        ids = self._prompt_ids(req.prompt, req.add_special_tokens)
        if req.max_tokens is None:
            req.max_tokens = self.cfg.default_max_tokens
        return await self._generate(request, req, ids, lora)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        req = P.decode_request(await request.read(), "chat", content_type=request.content_type,
                               max_model_len=self.cfg.max_model_len)
        lora = self._check_model(req.model)
        ids = self.tok.encode_chat(
            req.messages, add_generation_prompt=req.add_generation_prompt, tools=req.tools,
            chat_template_kwargs=req.chat_template_kwargs,
            continue_final_message=req.continue_final_message, documents=req.documents,
            chat_template=req.chat_template, add_special_tokens=req.add_special_tokens)
        if req.max_tokens is None and req.max_completion_tokens is None:
            # vLLM would fill the context; a random model never stops, so cap it.
            req.max_completion_tokens = self.cfg.chat_default_max_tokens
        return await self._generate(request, req, ids, lora)

    async def _generate(self, request: web.Request,
                        req: P.CompletionRequest | P.ChatCompletionRequest,
                        ids: list[int], lora: str | None) -> web.StreamResponse:
        """Run one checked request on the engine; stream it or answer with one body."""
        chat = isinstance(req, P.ChatCompletionRequest)
        max_tokens = P.resolve_max_tokens(req, len(ids), self.cfg.max_model_len)
        failed = self._inject_failure()
        if failed is not None:
            return failed
        rid = P.response_id("chat" if chat else "completion", req,
                            request.headers.get("X-Request-Id"))
        sreq = self._submit(rid, ids, max_tokens, lora, req)
        model = req.model or self.served
        if req.stream:
            stream_cls = P.ChatStream if chat else P.CompletionStream
            stream = stream_cls.for_request(req, rid, model, prompt_tokens=len(ids),
                                            system_fingerprint=self.fingerprint)
            return await self._stream(request, sreq, stream, req, chat=chat)
        text, reason, stop_reason, used = await self._collect(sreq, req)
        build = P.chat_completion_response if chat else P.completion_response
        body = build(rid, model, text, prompt_tokens=len(ids), completion_tokens=used,
                     finish_reason=reason, stop_reason=stop_reason,
                     cached_tokens=self._cached(sreq), system_fingerprint=self.fingerprint)
        return web.Response(body=body, content_type="application/json")

    def _cached(self, sreq: SimRequest) -> int | None:
        return sreq.cached_tokens if self.cfg.enable_prompt_tokens_details else None

    def _submit(self, rid: str, ids: list[int], max_tokens: int, lora: str | None,
                req: P.CompletionRequest | P.ChatCompletionRequest) -> SimRequest:
        sreq = SimRequest(
            request_id=rid, prompt_ids=ids, max_tokens=max_tokens, lora_name=lora,
            cache_salt=req.cache_salt, seed=req.seed,
            stop_token_ids=frozenset(req.stop_token_ids or ()),
        )
        self.engine.submit(sreq)
        return sreq

    @staticmethod
    def _stops(req: P.CompletionRequest | P.ChatCompletionRequest) -> list[str]:
        return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])

    async def _collect(self, sreq: SimRequest,
                       req: P.CompletionRequest | P.ChatCompletionRequest,
                       ) -> tuple[str, str, str | int | None, int]:
        """Wait for a non-streamed request: (text, finish reason, stop reason, tokens used).

        Stop strings are checked as tokens arrive, as vLLM does, so a match ends the request
        there instead of generating to max_tokens.
        """
        detok = self.tok.detokenizer(sreq.prompt_ids)
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
            raise P.RequestError(503, "The request could not be scheduled: it does not fit the "
                                 "KV cache", "ServiceUnavailableError")
        assert reason is not None
        return text, reason, stop_reason, used

    async def _stream(self, request: web.Request, sreq: SimRequest, stream: Any,
                      req: P.CompletionRequest | P.ChatCompletionRequest,
                      chat: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        detok = self.tok.detokenizer(sreq.prompt_ids)
        stops = self._stops(req)
        text_so_far = ""
        try:
            if chat:
                await resp.write(stream.first())
            while True:
                tok, reason = await sreq.out.get()
                if tok is None:
                    if reason == "abort":
                        await resp.write(P.stream_error_event(
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


class SimServer:
    """Every engine of this process, their HTTP servers and KV publishers."""

    def __init__(self, cfg: SimConfig) -> None:
        from infermesh.libs.tinymodel import DEFAULT_MODEL_NAME, ensure_model_folder

        self.cfg = cfg
        self.model_dir = Path(cfg.model) if cfg.model else ensure_model_folder()
        self.served_model_name = cfg.served_model_name or DEFAULT_MODEL_NAME
        self.tokenizer = ModelTokenizer.from_folder(self.model_dir,
                                                    max_model_len=cfg.max_model_len)
        self.vocab = sampling_vocab(self.tokenizer)
        self.ctx = zmq.asyncio.Context()
        self.engines: list[SimEngine] = []
        self.endpoints: list[EngineEndpoints] = []
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        """Start every engine and its HTTP server."""
        cfg = self.cfg
        for i in range(cfg.engines):
            http_port = cfg.port + i if cfg.port else 0
            sock = self._bind_http(http_port)
            port = sock.getsockname()[1]
            topic = cfg.kv_topic or f"kv@{cfg.host}:{port}@{self.served_model_name}"
            publisher = None
            kv = replay = ""
            if cfg.kv_events:
                kv_port = cfg.kv_port + 2 * i if cfg.kv_port else 0
                publisher, kv, replay = self._bind_zmq(kv_port, topic, cfg.kv_replay_port)
            metrics = EngineMetrics(
                self.served_model_name, i,
                vllm_cache_config_labels(
                    block_size=cfg.block_size, num_gpu_blocks=cfg.num_gpu_blocks,
                    num_cpu_blocks=cfg.num_cpu_blocks or None,
                    prefix_caching_hash_algo=cfg.hash_algo),
                max_model_len=cfg.max_model_len, enable_lora=bool(cfg.loras))
            engine = SimEngine(cfg, i, self.served_model_name, self.vocab,
                               self.tokenizer.eos_token_id, metrics, publisher)
            engine.start()
            await self._serve(EngineApp(self, engine, metrics), sock)
            self.engines.append(engine)
            self.endpoints.append(
                EngineEndpoints(i, f"http://{cfg.host}:{port}", kv, replay, topic))
        log.info("sim_started", engines=[e.__dict__ for e in self.endpoints],
                 model=self.served_model_name)

    def _bind_http(self, port: int) -> socket.socket:
        # Bind before serving (port 0 → a free port) so the KV topic can name the real port.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.cfg.host, port))
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    async def _serve(self, app: EngineApp, sock: socket.socket) -> None:
        # handler_cancellation: a client that hangs up cancels its handler, which aborts the
        # request in the engine (as vLLM does); shutdown_timeout: stop promptly on SIGTERM.
        runner = web.AppRunner(app.app(), access_log=None, handle_signals=False,
                               handler_cancellation=True, shutdown_timeout=2.0)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runners.append(runner)

    def _bind_zmq(self, port: int, topic: str,
                  replay_port: int = 0) -> tuple[ZmqKVPublisher, str, str]:
        host = self.cfg.host
        replay_port = replay_port or (port + 1 if port else 0)
        pub_ep = f"tcp://{host}:{port}" if port else f"tcp://{host}:*"
        rep_ep = f"tcp://{host}:{replay_port}" if replay_port else f"tcp://{host}:*"
        pub = ZmqKVPublisher(self.ctx, pub_ep, rep_ep, topic=topic,
                             buffer_steps=self.cfg.replay_buffer_steps, bind=True)
        return pub, pub.endpoint, pub.replay_endpoint or ""

    def write_ready_file(self, path: str) -> None:
        """Write the endpoints as JSON, atomically."""
        data = {"model": self.served_model_name, "model_dir": str(self.model_dir),
                "pid": os.getpid(), "started": time.time(),
                "engines": [e.__dict__ for e in self.endpoints]}
        tmp = f"{path}.tmp{os.getpid()}"
        Path(tmp).write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)

    async def stop(self) -> None:
        """Stop every engine (in-flight requests end), stop serving, close the sockets."""
        for e in self.engines:
            await e.stop()
        for r in self._runners:
            with contextlib.suppress(Exception):
                await r.cleanup()
        self.ctx.term()
