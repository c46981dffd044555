"""The ingress: an OpenAI-compatible HTTP front that routes each request to the best engine.

For each completion or chat request: check the body, ask the tokenizer for the prompt's length and
block keys, ask the scheduler for a pod, publish a ``routed`` event, and proxy the original body to
that pod (streamed responses pass through as they come). If the pod fails before answering, another
is tried. ``first_token`` and ``finished`` events follow, so every scheduler replica sees the same
load. Client mistakes get OpenAI-style JSON errors (4xx), never a 500.

When the tokenizer or the scheduler does not answer in time, the ingress still serves: it routes
by the load the heartbeats report (and logs it), and cache-aware routing resumes by itself. A
prompt too large for one bus message (the server's ``max_payload``, 1 MiB by default) is routed
by load the same way, and the engine answers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import os
import random
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from nats.aio.client import Client
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import generate_latest

from infermesh.libs import liveness
from infermesh.libs.bus import (
    BUS_REGISTRY,
    BusError,
    NoResponders,
    PayloadTooLarge,
    RemoteError,
    connect,
    fits,
    request,
)
from infermesh.libs.flowcontrol import FlowQueue, PodLoad, Ticket
from infermesh.libs.scheduling.core import ScheduleError, SchedulerCore, prefill_request_id
from infermesh.libs.scheduling.scheduler import total_scores
from infermesh.libs.telemetry import (
    extract_context,
    get_logger,
    inject_context,
    tracer,
    tracing_configured,
)
from infermesh.libs.tokenization.prompts import PromptError, PromptTokenizer
from infermesh.proto import codec
from infermesh.proto.messages import (
    PodState,
    RequestEvent,
    RouteRequest,
    ScaleDemand,
    ScheduleDecision,
    ScheduleRequest,
    TokenizeReply,
    TokenizeRequest,
)
from infermesh.proto.subjects import Subjects

from .auth import KEY_NAME, ApiKeyGuard, ApiKeys, server_ssl_context
from .config import IngressConfig
from .flow import FlowGate, Refused
from .metrics import IngressMetrics

log = get_logger("ingress")

# Seconds the request being served (this task) waited in the ingress so far (for an engine to
# start, or for room in a saturated pool).
_HELD_S: contextvars.ContextVar[float] = contextvars.ContextVar("held_s", default=0.0)
# The flow-control ticket of the request being served (its priority band, tenant, deadline).
_TICKET: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("ticket", default=None)

ENDPOINT_HEADER = "x-infermesh-endpoint"
PREFILL_HEADER = "x-infermesh-prefill-endpoint"  # the engine that prefilled (P/D)
ROUTING_HEADER = "x-infermesh-routing-ms"  # request received → first byte sent to the engine
PROFILE_HEADER = "x-infermesh-profile"
# Flow control (docs/flow-control.md): priority band (higher first; negative: sheddable),
# tenant (when no API keys name them), deadline in milliseconds from arrival (EDF ordering).
PRIORITY_HEADER = "x-infermesh-priority"
TENANT_HEADER = "x-infermesh-tenant"
DEADLINE_HEADER = "x-infermesh-deadline-ms"
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                413: "RequestEntityTooLarge", 429: "RateLimitError", 500: "InternalServerError",
                502: "BadGatewayError",
                503: "ServiceUnavailableError", 504: "GatewayTimeoutError"}

_json = msgspec.json.Encoder()


class ClientError(Exception):
    """A request the ingress refuses; becomes an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """``{"error": {"message", "type", "param", "code"}}`` with the given status."""
    body = _json.encode({"error": {"message": message,
                                   "type": _ERROR_TYPES.get(status, "BadRequestError"),
                                   "param": param, "code": status}})
    return web.Response(status=status, body=body, content_type="application/json",
                        headers=headers)


class _Body(msgspec.Struct):
    """The fields of a completion or chat body that routing needs; the rest passes through."""

    model: str | None = None
    prompt: Any = None
    messages: Any = None
    stream: bool | None = False
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None
    cache_salt: str | None = None
    priority: int = 0  # vLLM's: lower is served earlier (flow control's band is its negative)


_body_decoder = msgspec.json.Decoder(_Body)


class _UsageDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _UsageDetails | None = None


class _WithUsage(msgspec.Struct):
    usage: _Usage | None = None


_usage_decoder = msgspec.json.Decoder(_WithUsage)
_USAGE_RE = re.compile(rb'data: (\{[^\n]*"usage":\{[^\n]*\})\s*$', re.M)


@dataclass
class _Pod:
    state: PodState
    seen: float
    since: float  # start of its unbroken run of heartbeats (liveness.since)
    in_flight: int = 0
    in_flight_at_beat: int = 0  # requests in flight on it (all routers') at its last heartbeat


@dataclass
class _Route:
    request_id: str
    model: str
    lora: str | None
    num_tokens: int
    block_keys: list[int]
    profile: str | None
    received: float
    excluded: list[str] = field(default_factory=list)
    routing_s: float = 0.0
    first: tuple[str, str] | None = None  # (pod, url) decided along the route, before _proxy
    partial: bool = False  # num_tokens is the tokenizer's estimate (TokenizeReply.partial)
    announced: bool = False  # a scheduler published the routed event of ``first``
    # The scheduler service's last answer, for the routed event this ingress publishes itself
    # (None: routed by load).
    decision: ScheduleDecision | None = None
    # Prefill/decode: the first decode attempt has been made (a retry serves the request whole)
    pd_tried: bool = False
    prefill_pod: str = ""  # the engine whose KV the answer was decoded with
    session: str | None = None  # the conversation (session_header / session_cookie)
    # Flow control let it go for room on some pods: the saturated ones are left out of its
    # decision (the room is elsewhere).
    saturated: list[str] = field(default_factory=list)


# vLLM's NixlConnector: what a prefill request asks for (docs/disaggregation.md).
_PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False,
                   "remote_engine_id": None, "remote_block_ids": None, "remote_host": None,
                   "remote_port": None}
_decode_json = msgspec.json.Decoder(dict[str, Any])


class _PrefillResponse(msgspec.Struct):
    kv_transfer_params: dict[str, Any] | None = None


class IngressService:
    """One ingress process: the HTTP server and its bus side."""

    def __init__(self, cfg: IngressConfig) -> None:
        self.cfg = cfg
        self.subjects = Subjects(cfg.subject_prefix)
        self.instance = cfg.instance or f"{socket.gethostname()}-{os.getpid()}"
        self._tracing = tracing_configured()  # OTEL_* ask for spans (docs/observability.md)
        self.metrics = IngressMetrics()
        self.pods: dict[str, _Pod] = {}
        self.nc: Client | None = None
        self.http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.http_port: int | None = None
        self._rng = random.Random()
        self._tokenizer_ok = 0.0  # monotonic time of the last answer
        self._scheduler_ok = 0.0
        # Requests wait here while the pool is saturated or has no ready engine (flow.py).
        self.flow = FlowGate(
            enabled=cfg.flow_control, thresholds=cfg.thresholds(),
            queue=FlowQueue(max_queued=cfg.hold_max_requests,
                            fairness=cfg.flow_fairness,  # type: ignore[arg-type]
                            ordering=cfg.flow_ordering,  # type: ignore[arg-type]
                            quantum=cfg.flow_quantum_tokens),
            queue_timeout_s=cfg.queue_timeout_s, no_pod_wait_s=cfg.no_pod_wait_s,
            demand_interval_s=cfg.demand_interval_s, loads=self._loads,
            publish_demand=self._publish_demand, registry=self.metrics.registry)
        self._pruned_at = 0.0
        self._refused: dict[str, float] = {}  # pod → when it last refused a connection
        # Built here so a bad key file or certificate stops the start before any bus work.
        self.guard = ApiKeyGuard(ApiKeys.from_settings(cfg.api_key, cfg.api_keys_file,
                                                       cfg.rate_limit_rps, cfg.rate_limit_burst),
                                 self.metrics.registry)
        self.ssl = server_ssl_context(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_ca_file)
        # The models whose prompts this process tokenizes itself (tokenize_here).
        self.tokenizer = PromptTokenizer(cfg) if cfg.tokenize_here else None
        # The scheduler replica this process decides with (schedule_here); built here so a bad
        # profiles file stops the start.
        self.sched = (SchedulerCore(cfg, self.instance, self.subjects) if cfg.schedule_here
                      else None)
        if self.sched is not None:
            self.sched.on_request_end = self.flow.poke

    # ------------------------------------------------------------------ lifecycle

    @property
    def http_scheme(self) -> str:
        """``https`` when the API is served with TLS."""
        return "https" if self.ssl is not None else "http"

    async def start(self) -> None:
        """Load the local tokenizers, connect to the bus, follow heartbeats, serve HTTP."""
        if self.tokenizer is not None:
            self.tokenizer.load_models()
        self.nc = await connect(self.cfg.nats_url, f"ingress-{self.instance}",
                                security=self.cfg.bus_security())
        await self.nc.subscribe(self.subjects.pod_state_all, cb=self._on_pod_state)
        if self.sched is not None:
            await self.sched.start(self.nc)
        self.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout_s),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=self.cfg.max_body_bytes,
                              middlewares=[self._errors])
        self.guard.install(app)  # after _errors: keys are checked before anything else runs
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.get_metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     handler_cancellation=True, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.http_host, self.cfg.http_port,
                           ssl_context=self.ssl)
        await site.start()
        server = site._server
        assert server is not None
        self.http_port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        scheme = "https" if self.ssl is not None else "http"
        log.info("ingress_started", url=f"{scheme}://{self.cfg.http_host}:{self.http_port}",
                 api_keys=len(self.guard.keys),
                 pool=self.cfg.pool, instance=self.instance)

    async def stop(self) -> None:
        """Stop serving and close connections."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self.http is not None:
            await self.http.close()
        await self.flow.close()
        if self.tokenizer is not None:
            await self.tokenizer.close()
        if self.sched is not None:
            await self.sched.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    # ------------------------------------------------------------------ pods

    async def _on_pod_state(self, msg: Any) -> None:
        try:
            st = codec.decode(msg.data, PodState)
        except codec.DecodeError:
            self.metrics.rejected.labels("bad_pod_state").inc()
            return
        if st.pool != self.cfg.pool:
            return
        pod = self.pods.get(st.pod)
        if not st.ready:
            # Evidence from the agent (the engine refuses connections or stopped answering).
            if pod is not None and pod.state.ready:
                self.metrics.pods_dropped.labels("not_ready").inc()
                log.info("pod_not_ready", pod=st.pod)
        elif pod is not None and not pod.state.ready:
            self._refused.pop(st.pod, None)  # back (a restarted engine): no longer refusing
        now = time.monotonic()
        if pod is None:
            pod = self.pods[st.pod] = _Pod(st, now, now)
        else:
            pod.since = liveness.since(pod.seen, pod.since, now, self.cfg.pod_late_s)
            pod.state, pod.seen = st, now
        pod.in_flight_at_beat = self._requests_on(pod)
        if st.ready:
            self.flow.poke()

    def _prune(self) -> None:
        """Forget pods silent for ``pod_timeout_s`` while others still speak (at most 4 times a
        second: it runs on the request path)."""
        now = time.monotonic()
        if now - self._pruned_at < 0.25:
            return
        self._pruned_at = now
        heard = {name: (p.seen, p.since) for name, p in self.pods.items()}
        for name in liveness.dead(heard, now, self.cfg.pod_late_s, self.cfg.pod_timeout_s):
            del self.pods[name]
            self.metrics.pods_dropped.labels("silent").inc()
            log.warning("pod_dropped", pod=name, reason="no heartbeat",
                        silent_s=self.cfg.pod_timeout_s)
        self.metrics.pods_late.set(liveness.late(
            (p.seen for p in self.pods.values() if p.state.ready), now, self.cfg.pod_late_s))

    def live_pods(self) -> list[_Pod]:
        """Pods whose agent says ready. A late heartbeat is not a dead pod: it stays, on its
        last known state, until :func:`liveness.dead` says otherwise."""
        self._prune()
        return [p for p in self.pods.values() if p.state.ready]

    def _requests_on(self, pod: _Pod) -> int:
        """Requests in flight on ``pod``: every router's (request events) when this process
        schedules, else this ingress's own."""
        if self.sched is not None:
            return self.sched.inflight.count(pod.state.pod)
        return pod.in_flight

    def _loads(self) -> list[PodLoad]:
        """The load of every ready engine that serves requests (prefill engines of a P/D pool
        only prefill), for the saturation detector. An engine queueing at its last heartbeat
        queues what was sent to it since, too."""
        out = []
        inflight = self.sched.inflight if self.sched is not None else None
        for p in self.live_pods():
            st = p.state
            if st.role == "prefill":
                continue
            n = self._requests_on(p)
            waiting = st.waiting + max(0, n - p.in_flight_at_beat) if st.waiting else 0
            out.append(PodLoad(
                st.pod, waiting=waiting, kv_usage=st.kv_usage, requests=n,
                uncached_tokens=(inflight.uncached_tokens(st.pod, st.block_size)
                                 if inflight is not None else 0)))
        return out

    def _ticket(self, request: web.Request, body: _Body) -> Ticket:
        """The request's flow-control ticket: its priority band (``x-infermesh-priority``,
        higher first, negative sheddable; else vLLM's ``priority`` field negated: lower is
        earlier there), its tenant (the API key's name; without keys ``x-infermesh-tenant``;
        else ``default``) and its deadline (``x-infermesh-deadline-ms`` from now)."""
        band = -body.priority
        raw = request.headers.get(PRIORITY_HEADER)
        if raw is not None:
            try:
                band = int(raw)
            except ValueError:
                raise ClientError(400, f"{PRIORITY_HEADER} must be an integer") from None
            if not -1_000_000 <= band <= 1_000_000:
                raise ClientError(400, f"{PRIORITY_HEADER} must be within +-1000000")
        tenant = request.get(KEY_NAME)
        if tenant is None:
            tenant = request.headers.get(TENANT_HEADER) or "default"
            if not _TENANT_RE.match(tenant):
                raise ClientError(400, f"{TENANT_HEADER} must be 1-64 letters, digits or "
                                  "._:@- (starting with a letter or digit)")
        deadline = math.inf
        raw = request.headers.get(DEADLINE_HEADER)
        if raw is not None:
            try:
                ms = float(raw)
            except ValueError:
                ms = -1.0
            if not 0 < ms < 1e10:
                raise ClientError(400, f"{DEADLINE_HEADER} must be a positive number of "
                                  "milliseconds")
            deadline = time.monotonic() + ms / 1000.0
        return Ticket(band=band, tenant=tenant, deadline=deadline)

    def _session(self, request: web.Request) -> str | None:
        """The conversation the request belongs to: ``session_header``, else the
        ``session_cookie`` (1-256 printable characters; else a 400)."""
        value = None
        if self.cfg.session_header:
            value = request.headers.get(self.cfg.session_header)
        if value is None and self.cfg.session_cookie:
            value = request.cookies.get(self.cfg.session_cookie)
        if value is None:
            return None
        if not 0 < len(value) <= 256 or not value.isprintable():
            raise ClientError(400, "the session id must be 1-256 printable characters")
        return value

    async def _wait_in_flow(self, no_engine_only: bool) -> Ticket | None:
        """Wait in flow control (see :class:`FlowGate`); the time waited for an engine to start
        goes on the request's events (``held_s``). Its 429 and 503 become the client's."""
        ticket = _TICKET.get()
        if ticket is None:
            ticket = Ticket(band=0, tenant="default")
        before = ticket.held_s
        try:
            return await self.flow.admit(ticket, no_engine_only=no_engine_only)
        except Refused as e:
            if e.status == 503 and no_engine_only:
                raise
            headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s else None
            raise ClientError(e.status, e.message, headers=headers) from None
        finally:
            # Only the wait for an engine to start is "held" (the autoscaler's SLO window
            # leaves it out); a wait for room in a saturated pool is the pool's latency.
            _HELD_S.set(_HELD_S.get() + ticket.held_s - before)

    async def _wait_for_pod(self, why: str) -> bool:
        """Hold the request (the activator's case of flow control) up to ``no_pod_wait_s`` for
        a ready heartbeat; True when one came (or an engine is ready already). A full queue is
        the 429, with Retry-After."""
        try:
            await self._wait_in_flow(no_engine_only=True)
        except Refused:
            if self.cfg.no_pod_wait_s > 0:
                self.metrics.no_pod_waits.labels("timed_out").inc()
                log.warning("no_engine_after_wait", reason=why, waited_s=self.cfg.no_pod_wait_s)
            return False
        self.metrics.no_pod_waits.labels("found").inc()
        return True

    async def _publish_demand(self, held: int) -> None:
        """What this ingress holds for its pool, for the autoscaler (``im.scale.<pool>``)."""
        if self.nc is None or not self.nc.is_connected:
            return
        model = next((p.state.model for p in self.pods.values()), "")
        demand = ScaleDemand(pool=self.cfg.pool, model=model, ts=time.time(), queued=held,
                             in_flight=sum(p.in_flight for p in self.pods.values()),
                             replica=self.instance)
        await self.nc.publish(self.subjects.scale(self.cfg.pool), codec.encode(demand))

    async def _resolve_model(self, model: str | None) -> tuple[str, str | None]:
        """(base model, LoRA adapter or None) for a model name; 404 when nobody serves it."""
        pods = self.live_pods()
        if not pods and await self._wait_for_pod("no ready engine"):
            pods = self.live_pods()
        if not pods:
            raise ClientError(503, "No engine is available for this pool right now")
        if model is None:
            return pods[0].state.model, None
        for p in pods:
            if p.state.model == model:
                return model, None
        for p in pods:
            if model in p.state.adapters:
                return p.state.model, model
        served = sorted({p.state.model for p in pods} | {a for p in pods for a in p.state.adapters})
        raise ClientError(404, f"The model `{model}` does not exist. Valid models: "
                          f"{', '.join(served)}.", "model")

    def _refused_recently(self) -> list[str]:
        """Pods that refused a connection within ``refused_backoff_s``."""
        if not self._refused:
            return []
        now = time.monotonic()
        for name in [n for n, t in self._refused.items() if now - t > self.cfg.refused_backoff_s]:
            del self._refused[name]
        return list(self._refused)

    # ------------------------------------------------------------------ HTTP: simple endpoints

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except ClientError as e:
            self.metrics.rejected.labels(str(e.status)).inc()
            return error_response(e.status, e.message, e.param, e.headers)
        except web.HTTPRequestEntityTooLarge:
            self.metrics.rejected.labels("413").inc()
            return error_response(413, f"Request body is larger than the limit of "
                                  f"{self.cfg.max_body_bytes} bytes")
        except web.HTTPException as e:
            if e.status >= 400:
                self.metrics.rejected.labels(str(e.status)).inc()
                return error_response(e.status, e.reason)
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:  # a bug: answer cleanly, keep serving
            log.exception("handler_failed", path=request.path)
            return error_response(500, f"internal error: {type(e).__name__}")

    async def health(self, _: web.Request) -> web.Response:
        ok = self.nc is not None and self.nc.is_connected
        body: dict[str, Any] = {"status": "ok" if ok else "bus_disconnected",
                                "pods": len(self.live_pods())}
        if self.sched is not None:
            body["scheduler"] = self.sched.health()
        return web.json_response(body, status=200 if ok else 503)

    async def get_metrics(self, _: web.Request) -> web.Response:
        local = generate_latest(self.tokenizer.metrics.registry) if self.tokenizer else b""
        if self.sched is not None:
            local += generate_latest(self.sched.metrics.registry)
        return web.Response(body=generate_latest(self.metrics.registry) + local
                            + generate_latest(BUS_REGISTRY),
                            content_type="text/plain", charset="utf-8")

    async def models(self, _: web.Request) -> web.Response:
        cards: dict[str, dict[str, Any]] = {}
        for p in self.live_pods():
            st = p.state
            cards.setdefault(st.model, {"id": st.model, "object": "model", "created": int(st.ts),
                                        "owned_by": "infermesh", "root": st.model, "parent": None,
                                        "max_model_len": st.max_model_len or None})
            for a in st.adapters:
                cards.setdefault(a, {"id": a, "object": "model", "created": int(st.ts),
                                     "owned_by": "infermesh", "root": a, "parent": st.model,
                                     "max_model_len": None})
        return web.Response(body=_json.encode({"object": "list", "data": list(cards.values())}),
                            content_type="application/json")

    # ------------------------------------------------------------------ HTTP: generation

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._traced(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._traced(request, chat=True)

    async def _traced(self, request: web.Request, chat: bool) -> web.StreamResponse:
        """One trace per request: a server span (the client's trace continued when it sent a
        ``traceparent``) around everything, whose context the bus requests and the engine
        requests carry on."""
        if not self._tracing:  # (no exporter: no spans, no cost on the request path)
            return await self._serve(request, chat)
        ctx = extract_context(dict(request.headers))
        with tracer().start_as_current_span(
                f"POST {request.path}", context=ctx, kind=SpanKind.SERVER) as span:
            try:
                resp = await self._serve(request, chat)
            except ClientError as e:
                span.set_attribute("http.response.status_code", e.status)
                raise
            span.set_attribute("http.response.status_code", resp.status)
            return resp

    def _fallback(self, reason: str) -> None:
        """A request routed another way than planned: counted, and said on its span."""
        self.metrics.fallbacks.labels(reason).inc()
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("fallback", {"infermesh.reason": reason})
            span.set_attribute("infermesh.fallback", reason)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        received = time.perf_counter()
        _HELD_S.set(0.0)
        endpoint = "chat" if chat else "completions"
        media = request.headers.get("Content-Type", "").lower().split(";", 1)[0].strip()
        if media != "application/json":  # as vLLM answers it
            raise ClientError(400, "1 validation error:\n  Unsupported Media Type: Only "
                                   "'application/json' is allowed")
        raw = await request.read()
        body = self._parse(raw, chat)
        ticket = self._ticket(request, body)
        _TICKET.set(ticket)
        model, lora = await self._resolve_model(body.model)
        try:
            self.flow.precheck(ticket)  # a flood is refused before it is tokenized
        except Refused as e:
            raise ClientError(e.status, e.message,
                              headers={"Retry-After": str(e.retry_after_s)}) from None
        profile = request.headers.get(PROFILE_HEADER) or self.cfg.profile or None
        route = _Route(request_id=request.headers.get("X-Request-Id") or uuid.uuid4().hex,
                       model=model, lora=lora, num_tokens=0, block_keys=[], profile=profile,
                       received=received, session=self._session(request))
        here = self.tokenizer is not None and model in self.tokenizer.tokenizers
        try:
            if here:  # no bus trip to tokenize
                await self._tokenize_here(route, body, chat)
            elif self.sched is not None or self.flow.busy() or not (
                    self.cfg.chained_routing and await self._route(route, body, chat)):
                await self._tokenize(route, body, chat)
            if route.first is None:
                # Flow control: wait here while the pool is saturated (its cost for fairness
                # between tenants: the prompt's tokens).
                ticket.cost = max(1, route.num_tokens)
                if await self._wait_in_flow(no_engine_only=False) is not None:
                    route.saturated = self.flow.saturated_pods()
            else:
                self.flow.passed(ticket)  # routed in one trip: the pool had room
            if route.first is None and self.sched is not None:
                await self._decide_here(route)  # no bus trip to decide
            if route.first is None and (here or self.sched is not None):
                # A scheduler service decides, and announces it (it holds the keys).
                pod, url, route.announced = await self._pick(route, announce=True)
                route.first = (pod, url)
        except BaseException:
            self.flow.settled(ticket)  # admitted, and failed before it was routed
            raise
        self.metrics.in_flight.inc()
        try:
            resp = await self._proxy(request, route, raw, bool(body.stream))
        finally:
            self.metrics.in_flight.dec()
            self.flow.settled(ticket)  # (_proxy does it once routed)
        self.metrics.requests.labels(endpoint, str(resp.status)).inc()
        return resp

    def _parse(self, raw: bytes, chat: bool) -> _Body:
        if not raw:
            raise ClientError(400, "The request body is empty; send a JSON object")
        try:
            body = _body_decoder.decode(raw)
        except msgspec.ValidationError as e:
            raise ClientError(400, f"Invalid request: {e}") from None
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            raise ClientError(400, f"The request body is not valid JSON: {e}") from None
        except RecursionError:  # msgspec gives up on deeply nested `Any` fields this way
            raise ClientError(400, "The request body nests JSON too deeply") from None
        if chat:
            msgs = body.messages
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
                raise ClientError(400, "`messages` must be a non-empty list of message objects",
                                  "messages")
        else:
            p = body.prompt
            ok = isinstance(p, str) or (isinstance(p, list) and p and (
                all(type(t) is int for t in p) or all(isinstance(t, (str, list)) for t in p)))
            if not ok:
                raise ClientError(400, "`prompt` must be a string, a list of token ids, or a "
                                  "list of those", "prompt")
        return body

    def _block_size(self) -> int:
        sizes = [p.state.block_size for p in self.live_pods() if p.state.block_size]
        return sizes[0] if sizes else 16

    def _max_len(self) -> int:
        if self.cfg.max_prompt_tokens:
            return self.cfg.max_prompt_tokens
        lens = [p.state.max_model_len for p in self.live_pods() if p.state.max_model_len]
        return min(lens) if lens else 0

    def _tokenize_request(self, route: _Route, body: _Body, chat: bool) -> TokenizeRequest:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not all(type(t) is int for t in prompt):
            prompt = prompt[0]  # a batch goes to one engine: route by its first prompt
        if isinstance(prompt, list) and not all(type(t) is int for t in prompt):
            raise ClientError(400, "`prompt` lists must hold token ids (ints)", "prompt")
        return TokenizeRequest(
            model=route.model, block_size=self._block_size(),
            prompt=None if chat else prompt, messages=body.messages if chat else None,
            add_special_tokens=body.add_special_tokens,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            chat_template_kwargs=body.chat_template_kwargs, chat_template=body.chat_template,
            tools=body.tools, documents=body.documents, lora_name=route.lora,
            cache_salt=body.cache_salt,
        )

    async def _route(self, route: _Route, body: _Body, chat: bool) -> bool:
        """Tokenize and schedule in one bus trip (``im.route``: the tokenizer passes the
        ScheduleRequest on, the scheduler answers here); False when the request must take the
        two separate trips instead (too large for one message, a service away or slow, no
        engine known to the scheduler yet: those paths handle each case)."""
        assert self.nc is not None
        if route.excluded:
            return False
        tok = self._tokenize_request(route, body, chat)
        sched = ScheduleRequest(request_id=route.request_id, model=route.model, num_tokens=0,
                                pool=self.cfg.pool, lora_name=route.lora, profile=route.profile,
                                exclude=self._refused_now(route), announce=True,
                                session_id=route.session)
        data = codec.encode(RouteRequest(tokenize=tok, schedule=sched))
        if not fits(self.nc, data):
            return False
        t0 = time.perf_counter()
        try:
            d = await request(self.nc, self.subjects.route, data, ScheduleDecision,
                              timeout=self.cfg.tokenize_timeout_s + self.cfg.schedule_timeout_s)
        except RemoteError as e:
            status = int(e.code) if e.code.isdigit() else 500
            if 400 <= status < 500:
                raise ClientError(status, e.description) from None
            self.metrics.route_trips.labels(f"fallback_{status}").inc()
            return False
        except BusError as e:
            self.metrics.route_trips.labels("fallback_unavailable").inc()
            log.info("route_unavailable_taking_two_trips", error=str(e))
            return False
        finally:
            self.metrics.route.observe(time.perf_counter() - t0)
        self.metrics.route_trips.labels("ok").inc()
        self._scheduler_ok = self._tokenizer_ok = time.monotonic()
        route.num_tokens = d.num_tokens or 0
        route.first = (d.pod, d.url)
        route.decision = d
        route.announced = True
        await self._check_length(tok, route.num_tokens, d.tokens_partial)
        return True

    async def _check_length(self, tok: TokenizeRequest, num_tokens: int, partial: bool) -> None:
        """vLLM's 400 for a prompt over the context length. A partial count (the tokenizer
        answered before tokenizing a never-seen tail) is an estimate: the engine checks its
        own max_model_len on the exact count, so only a stricter ``max_prompt_tokens`` (which
        no engine enforces) makes the ingress ask for the exact count."""
        limit = self._max_len()
        if not limit:
            return
        if partial:
            if not self.cfg.max_prompt_tokens:
                return
            assert self.nc is not None
            exact = msgspec.structs.replace(tok, return_token_ids=True)  # never partial
            try:
                if self.tokenizer is not None and tok.model in self.tokenizer.tokenizers:
                    num_tokens = (await self.tokenizer.answer(exact)).num_tokens
                else:
                    num_tokens = (await request(self.nc, self.subjects.tokenize, exact,
                                                TokenizeReply,
                                                timeout=self.cfg.tokenize_timeout_s)).num_tokens
            except (BusError, PromptError) as e:
                log.warning("exact_count_failed", error=str(e))
                return
        if num_tokens > limit:
            raise ClientError(400, f"This model's maximum context length is {limit} tokens. "
                              f"However, your prompt contains {num_tokens} input tokens. "
                              "Please reduce the length of the input prompt.", "input_tokens")

    async def _tokenize_here(self, route: _Route, body: _Body, chat: bool) -> None:
        """Token count and block keys from this process's own tokenizer (tokenize_here)."""
        assert self.tokenizer is not None
        req = self._tokenize_request(route, body, chat)
        t0 = time.perf_counter()
        try:
            reply = await self.tokenizer.answer(req)
        except PromptError as e:
            if 400 <= e.status < 500:
                raise ClientError(e.status, e.message) from None
            self._fallback("tokenizer_error")
            log.warning("tokenizer_failed", error=e.message)
            return
        except Exception as e:  # noqa: BLE001 - route by load rather than fail the request
            self._fallback("tokenizer_error")
            log.warning("tokenizer_failed", error=repr(e))
            return
        finally:
            self.metrics.tokenize.observe(time.perf_counter() - t0)
        route.num_tokens, route.block_keys = reply.num_tokens, reply.block_keys
        route.partial = reply.partial
        await self._check_length(req, reply.num_tokens, reply.partial)

    async def _repick(self, route: _Route) -> tuple[str, str, bool]:
        """Another pod after a failed attempt: decided here when this process schedules, else
        by the scheduler service (or by load); (pod, url, announced)."""
        if self.sched is not None:
            route.first = None
            await self._decide_here(route)
            if route.first is not None:
                return (*route.first, True)
        return await self._pick(route)

    async def _decide_here(self, route: _Route) -> None:
        """The decision of this process's scheduler replica (schedule_here), announced on the
        bus; leaves ``route.first`` unset when it knows no engine for the request yet (a fresh
        start: the scheduler service, or the wait for a heartbeat, takes it from there)."""
        assert self.sched is not None
        req = self._schedule_request(route, announce=True)
        t0 = time.perf_counter()
        try:
            d = await self.sched.decide(req)
        except ScheduleError as e:
            if e.status == 400:
                raise ClientError(400, e.message) from None
            self._fallback("scheduled_here_no_engine")
            return
        except Exception as e:  # noqa: BLE001 - the scheduler service can still decide
            self._fallback("scheduled_here_failed")
            log.warning("schedule_here_failed", error=repr(e))
            return
        finally:
            self.metrics.schedule.observe(time.perf_counter() - t0)
        route.first, route.announced, route.decision = (d.pod, d.url), True, d

    async def _tokenize(self, route: _Route, body: _Body, chat: bool) -> None:
        assert self.nc is not None
        req = self._tokenize_request(route, body, chat)
        data = codec.encode(req)
        if not fits(self.nc, data):
            # One bus message cannot carry this prompt: route it by load alone, as when the
            # tokenizer is away, and let the engine answer it (its own 400 when the prompt is
            # over its max_model_len). Without a token count the max_prompt_tokens check below
            # cannot apply.
            self._too_large_for_bus(route, len(data))
            return
        t0 = time.perf_counter()
        try:
            reply = await self._ask_tokenizer(data)
        except PayloadTooLarge:  # the bus's limit shrank since the check (another node)
            self._too_large_for_bus(route, len(data))
            return
        except RemoteError as e:
            status = int(e.code) if e.code.isdigit() else 500
            if 400 <= status < 500:
                raise ClientError(status, e.description) from None
            self._fallback("tokenizer_error")
            log.warning("tokenizer_failed", error=str(e))
            return
        except BusError as e:
            # Route without block keys (load only) rather than fail the request.
            self._fallback("tokenizer_unavailable")
            log.warning("tokenizer_unavailable", error=str(e))
            self._tokenizer_ok = 0.0  # an outage, not a blip: later requests do not wait
            return
        finally:
            self.metrics.tokenize.observe(time.perf_counter() - t0)
        route.num_tokens, route.block_keys = reply.num_tokens, reply.block_keys
        route.partial = reply.partial
        await self._check_length(req, reply.num_tokens, reply.partial)

    def _too_large_for_bus(self, route: _Route, size: int) -> None:
        """Count and log a prompt that goes without tokenizing: one bus message cannot hold it."""
        assert self.nc is not None
        self._fallback("too_large_for_bus")
        log.warning("prompt_too_large_for_bus_routing_by_load", request_id=route.request_id,
                    bytes=size, max_payload=self.nc.max_payload)

    async def _ask_tokenizer(self, req: bytes) -> TokenizeReply:
        """The tokenizer's reply to an encoded request; asked a second time when the first ask
        got none.

        A NATS node or tokenizer replica that dies takes the requests it holds with it, and the
        replicas that were on that node answer again once reconnected (milliseconds later), so
        one more try keeps the prompt's block keys instead of routing by load alone.
        """
        assert self.nc is not None
        try:
            reply = await request(self.nc, self.subjects.tokenize, req, TokenizeReply,
                                  timeout=self.cfg.tokenize_timeout_s)
        except BusError as e:
            if isinstance(e, (RemoteError, PayloadTooLarge)):
                raise
            log.info("tokenizer_retry", error=str(e))
            if isinstance(e, NoResponders) and self._recently(self._tokenizer_ok):
                await asyncio.sleep(0.1)  # give replicas on a lost node time to reconnect
            reply = await request(self.nc, self.subjects.tokenize, req, TokenizeReply,
                                  timeout=self.cfg.tokenize_timeout_s)
        self._tokenizer_ok = time.monotonic()
        return reply

    @staticmethod
    def _recently(t: float) -> bool:
        """Whether a service answered within the last 2 s: a fresh cut, worth a short wait.

        Once a request has waited and still found nobody, the time is reset: in an outage the
        retry follows at once, so fallback routing adds no delay.
        """
        return time.monotonic() - t < 2.0

    def _refused_now(self, route: _Route) -> list[str]:
        """The pods to leave out of a decision: the request's own failed ones, and engines that
        just refused a connection while others are left."""
        exclude = route.excluded
        refused = self._refused_recently()
        if refused:
            others = {p.state.pod for p in self.live_pods() if p.state.model == route.model}
            others.difference_update(route.excluded, refused)
            if others:
                exclude = [*route.excluded, *(r for r in refused if r not in route.excluded)]
        if route.saturated and not exclude:  # a first attempt that waited for room
            others = {p.state.pod for p in self.live_pods()
                      if p.state.model == route.model and p.state.role != "prefill"}
            if others - set(route.saturated):
                exclude = list(route.saturated)
        return exclude

    def _schedule_request(self, route: _Route, announce: bool) -> ScheduleRequest:
        """The request's ScheduleRequest (keys, count, pods to leave out), for the scheduler
        here or the service."""
        return ScheduleRequest(request_id=route.request_id, model=route.model,
                               num_tokens=route.num_tokens, block_keys=route.block_keys,
                               tokens_partial=route.partial, pool=self.cfg.pool,
                               lora_name=route.lora, profile=route.profile,
                               exclude=self._refused_now(route), announce=announce,
                               session_id=route.session)

    async def _pick(self, route: _Route, announce: bool = False) -> tuple[str, str, bool]:
        """(pod, url, announced) from the scheduler, or from heartbeats when it does not answer
        (``announced``: the scheduler published the routed event, as asked by ``announce``)."""
        assert self.nc is not None
        req = self._schedule_request(route, announce=announce)
        t0 = time.perf_counter()
        waited = False
        route.decision = None
        try:
            # Twice: if the replica that got the request died, the queue group's next
            # member answers the second one.
            attempt = 0
            while attempt < 2:
                attempt += 1
                try:
                    d = await request(self.nc, self.subjects.schedule, req, ScheduleDecision,
                                      timeout=self.cfg.schedule_timeout_s)
                    self._scheduler_ok = time.monotonic()
                    route.decision = d
                    return d.pod, d.url, announce
                except PayloadTooLarge as e:  # block keys of a prompt near the bus's limit
                    self._fallback("too_large_for_bus")
                    log.warning("schedule_request_too_large_routing_by_load", error=str(e),
                                request_id=route.request_id)
                    break
                except RemoteError as e:
                    if e.code == "400":
                        raise ClientError(400, e.description) from None
                    if e.code == "503":
                        # The scheduler knows no engine for it (yet): wait for a heartbeat once,
                        # as a request that finds no pod here does, then ask again.
                        if not waited and await self._wait_for_pod(e.description):
                            waited = True
                            attempt -= 1
                            continue
                        raise ClientError(503, e.description) from None
                    self._fallback("scheduler_error")
                    log.warning("scheduler_failed", error=str(e))
                    break
                except BusError as e:
                    if attempt == 2:
                        self._fallback("scheduler_unavailable")
                        log.warning("scheduler_unavailable_routing_by_load", error=str(e))
                        self._scheduler_ok = 0.0  # an outage: later requests do not wait
                    elif isinstance(e, NoResponders) and self._recently(self._scheduler_ok):
                        # Replicas on a lost NATS node reconnect within milliseconds.
                        await asyncio.sleep(0.1)
        finally:
            self.metrics.schedule.observe(time.perf_counter() - t0)
        return (*self._least_loaded(route), False)

    def _least_loaded(self, route: _Route) -> tuple[str, str]:
        pods = [p for p in self.live_pods() if p.state.pod not in route.excluded
                and (p.state.model == route.model)]
        if any(p.state.role != "prefill" for p in pods):  # prefill engines only prefill
            pods = [p for p in pods if p.state.role != "prefill"]
        refused = set(self._refused_recently())
        if refused and any(p.state.pod not in refused for p in pods):
            pods = [p for p in pods if p.state.pod not in refused]
        if not pods:
            raise ClientError(503, "No engine is available for this model right now")
        best = min(p.state.running + p.state.waiting + p.in_flight for p in pods)
        choice = self._rng.choice([p for p in pods
                                   if p.state.running + p.state.waiting + p.in_flight == best])
        return choice.state.pod, choice.state.url

    async def _event(self, route: _Route, kind: str, pod: str, **kw: Any) -> None:
        assert self.nc is not None
        rid = kw.pop("request_id", route.request_id)
        ev = RequestEvent(kind=kind, request_id=rid, pod=pod,  # type: ignore[arg-type]
                          pool=self.cfg.pool, model=route.model, ts=time.time(),
                          replica=self.instance, held_s=_HELD_S.get(), **kw)
        if self.sched is not None and kind != "routed":
            # This replica's own view first (flow control looks for room at once); the echo
            # from the bus changes nothing more (InFlight takes an event once).
            if kind == "finished":
                self.sched.inflight.finished(rid, pod)
            else:
                self.sched.inflight.touch(rid, pod)
            self.flow.poke()
        with contextlib.suppress(Exception):  # events are best effort; never fail a request
            await self.nc.publish(self.subjects.req(self.cfg.pool), codec.encode(ev))

    async def _proxy(self, request: web.Request, route: _Route, raw: bytes,
                     stream: bool) -> web.StreamResponse:
        assert self.http is not None
        last_error = "no engine answered"
        for attempt in range(self.cfg.max_attempts):
            announced = False
            if attempt == 0 and route.first is not None:
                pod, url = route.first  # decided along the route
                announced = route.announced  # by the scheduler (routed, with the keys)
            else:
                pod, url, announced = await self._repick(route)
            d = route.decision if route.decision and route.decision.pod == pod else None
            pd = d is not None and bool(d.prefill_pod) and not route.pd_tried
            if not announced:
                await self._event(route, "routed", pod, num_tokens=route.num_tokens,
                                  block_keys=route.block_keys,
                                  profile=d.profile if d else "",
                                  scores=total_scores(d) if d else {},
                                  cached_blocks=d.cached_blocks if d else 0,
                                  leg="decode" if pd else "", session=route.session or "")
            body = raw
            if attempt > 0 and route.prefill_pod:  # the decode with the KV failed: served whole
                self.metrics.pd.labels("decode_retried_whole").inc()
            route.prefill_pod = ""
            if pd:
                assert d is not None
                route.pd_tried = True
                got = await self._prefill_leg(request, route, raw, d, announced)
                if isinstance(got, web.StreamResponse):  # the prefill engine refused it (4xx)
                    await self._event(route, "finished", pod, status="prefill_refused")
                    return got
                body = got
            tracked = self.pods.get(pod)
            if tracked is not None:
                tracked.in_flight += 1
            # Routed and counted: flow control may look for room for the next one.
            self.flow.settled(_TICKET.get())
            if attempt == 0:
                route.routing_s = time.perf_counter() - route.received
                self.metrics.routing.observe(route.routing_s)
            root = trace.get_current_span()
            if self._tracing and root.is_recording():
                root.set_attributes({"infermesh.pod": pod, "infermesh.attempts": attempt + 1,
                                     "infermesh.request_id": route.request_id,
                                     "infermesh.num_tokens": route.num_tokens,
                                     "infermesh.profile": route.profile or "",
                                     "infermesh.held_s": _HELD_S.get()})
            # One client span per attempt; its context goes to the engine (traceparent).
            with (tracer().start_as_current_span(
                    f"engine {pod}", kind=SpanKind.CLIENT,
                    attributes={"infermesh.pod": pod, "infermesh.attempt": attempt + 1,
                                "server.address": url}) if self._tracing
                  else contextlib.nullcontext(trace.INVALID_SPAN)) as span:
                try:
                    upstream = await self.http.post(
                        url + request.path, data=body,
                        headers=inject_context({"Content-Type": "application/json",
                                                "X-Request-Id": route.request_id}))
                except (TimeoutError, aiohttp.ClientError, OSError) as e:
                    last_error = f"engine {pod} unreachable: {type(e).__name__}"
                    span.set_status(StatusCode.ERROR, last_error)
                    if isinstance(e, aiohttp.ClientConnectorError):
                        self._refused[pod] = time.monotonic()
                    await self._failed_attempt(route, pod, tracked, last_error)
                    continue
                span.set_attribute("http.response.status_code", upstream.status)
                if upstream.status >= 500 and attempt + 1 < self.cfg.max_attempts:
                    last_error = f"engine {pod} answered {upstream.status}"
                    span.set_status(StatusCode.ERROR, last_error)
                    upstream.release()
                    await self._failed_attempt(route, pod, tracked, last_error)
                    continue
                try:
                    return await self._relay(request, route, pod, upstream, stream)
                finally:
                    if tracked is not None:
                        tracked.in_flight -= 1
                    upstream.release()
        raise ClientError(503, f"No engine could serve the request: {last_error}")

    async def _prefill_leg(self, request: web.Request, route: _Route, raw: bytes,
                           d: ScheduleDecision, announced: bool) -> bytes | web.StreamResponse:
        """Prefill a disaggregated request: the prefill engine computes the prompt's KV and
        answers with the ``kv_transfer_params`` the decode engine pulls it with. Returns the
        body for the decode engine (the client's, with those params), or the prefill engine's
        own 4xx for a request it refuses (the decode engine would refuse it too).

        A prefill engine that fails (unreachable, 5xx) is replaced by the least loaded other
        prefill engine; when none answers, the request is decoded whole (the decode engine
        computes the prompt itself), as is one whose prefill answer carries no params."""
        assert self.http is not None
        chat = request.path.endswith("/chat/completions")
        body = _decode_json.decode(raw)
        pre = dict(body)
        pre["stream"] = False
        pre.pop("stream_options", None)
        pre.pop("min_tokens", None)
        pre["max_tokens"] = 1
        if chat:
            pre["max_completion_tokens"] = 1
        pre["kv_transfer_params"] = dict(_PREFILL_PARAMS)
        pre_raw = _json.encode(pre)
        leg_id = prefill_request_id(route.request_id)
        pod, url = d.prefill_pod, d.prefill_url
        tried: list[str] = []
        params: dict[str, Any] | None = None
        for attempt in range(self.cfg.max_attempts):
            if attempt > 0:
                nxt = self._least_loaded_prefill(route, tried)
                if nxt is None:
                    break
                pod, url = nxt
                self.metrics.pd.labels("prefill_retried").inc()
            if attempt > 0 or not announced:
                await self._event(route, "routed", pod, request_id=leg_id,
                                  num_tokens=route.num_tokens, block_keys=route.block_keys,
                                  profile=d.prefill_profile, leg="prefill")
            tried.append(pod)
            t0 = time.perf_counter()
            with (tracer().start_as_current_span(
                    f"prefill {pod}", kind=SpanKind.CLIENT,
                    attributes={"infermesh.pod": pod, "infermesh.attempt": attempt + 1,
                                "infermesh.leg": "prefill", "server.address": url})
                  if self._tracing else contextlib.nullcontext(trace.INVALID_SPAN)) as span:
                try:
                    async with self.http.post(
                            url + request.path, data=pre_raw,
                            headers=inject_context({"Content-Type": "application/json",
                                                    "X-Request-Id": leg_id})) as resp:
                        data = await resp.read()
                        status = resp.status
                except (TimeoutError, aiohttp.ClientError, OSError) as e:
                    why = f"prefill engine {pod} unreachable: {type(e).__name__}"
                    span.set_status(StatusCode.ERROR, why)
                    log.warning("prefill_failed", pod=pod, error=why,
                                request_id=route.request_id)
                    if isinstance(e, aiohttp.ClientConnectorError):
                        self._refused[pod] = time.monotonic()
                    await self._event(route, "finished", pod, request_id=leg_id,
                                      status="failed", leg="prefill")
                    continue
            self.metrics.prefill.observe(time.perf_counter() - t0)
            if status >= 500:
                log.warning("prefill_failed", pod=pod, status=status,
                            request_id=route.request_id)
                await self._event(route, "finished", pod, request_id=leg_id,
                                  status=f"http_{status}", leg="prefill")
                continue
            await self._event(route, "finished", pod, request_id=leg_id, leg="prefill",
                              status="ok" if status < 400 else f"http_{status}")
            if status >= 400:
                return web.Response(status=status, body=data, headers={
                    ENDPOINT_HEADER: pod, PREFILL_HEADER: pod,
                    "Content-Type": "application/json"})
            try:
                params = msgspec.json.decode(data, type=_PrefillResponse).kv_transfer_params
            except (msgspec.DecodeError, msgspec.ValidationError):
                params = None
            if not params:
                log.warning("prefill_without_kv_params", pod=pod, request_id=route.request_id)
                self.metrics.pd.labels("no_kv_params").inc()
                return raw
            route.prefill_pod = pod
            self.metrics.pd.labels("disaggregated").inc()
            body["kv_transfer_params"] = params
            return _json.encode(body)
        self.metrics.pd.labels("prefill_failed").inc()
        self._fallback("prefill_failed")
        return raw

    def _least_loaded_prefill(self, route: _Route, tried: list[str]) -> tuple[str, str] | None:
        """Another prefill engine for the model, the least loaded by heartbeats (a retry does
        not ask the scheduler again: that would move the request's own count)."""
        pods = [p for p in self.live_pods() if p.state.role == "prefill"
                and p.state.model == route.model and p.state.pod not in tried]
        if not pods:
            return None
        best = min(pods, key=lambda p: (p.state.running + p.state.waiting + p.in_flight,
                                        self._rng.random()))
        return best.state.pod, best.state.url

    async def _failed_attempt(self, route: _Route, pod: str, tracked: _Pod | None,
                              why: str) -> None:
        log.warning("engine_attempt_failed", pod=pod, error=why, request_id=route.request_id)
        if tracked is not None:
            tracked.in_flight -= 1
        route.excluded.append(pod)
        self.metrics.retries.inc()
        await self._event(route, "finished", pod, status="failed")

    async def _relay(self, request: web.Request, route: _Route, pod: str,
                     upstream: aiohttp.ClientResponse, stream: bool) -> web.StreamResponse:
        headers = {ENDPOINT_HEADER: pod, ROUTING_HEADER: f"{route.routing_s * 1000:.3f}",
                   "Content-Type": upstream.headers.get("Content-Type", "application/json")}
        if route.prefill_pod:
            headers[PREFILL_HEADER] = route.prefill_pod
        status = "ok" if upstream.status < 400 else f"http_{upstream.status}"
        if not stream or upstream.status >= 400:
            data = await upstream.read()
            e2e = time.perf_counter() - route.received
            out, cached = _usage_of(data)
            await self._event(route, "finished", pod, output_tokens=out, cached_tokens=cached,
                              status=status, ttft_s=e2e)
            return web.Response(status=upstream.status, body=data, headers=headers)
        resp = web.StreamResponse(status=upstream.status, headers=headers)
        await resp.prepare(request)
        first = True
        tail = b""
        ttft: float | None = None
        try:
            async for chunk in upstream.content.iter_any():
                if first:
                    first = False
                    ttft = time.perf_counter() - route.received
                    self.metrics.ttft.observe(ttft)
                    await self._event(route, "first_token", pod, ttft_s=ttft)
                await resp.write(chunk)
                tail = (tail + chunk)[-8192:]
            await resp.write_eof()
        except (TimeoutError, aiohttp.ClientError) as e:
            # The engine died mid-stream: the client gets a clean error event and the end.
            log.warning("engine_failed_mid_stream", pod=pod, error=repr(e))
            status = "engine_failed"
            err = _json.encode({"error": {"message": f"engine {pod} failed mid-stream",
                                          "type": "BadGatewayError", "param": None,
                                          "code": 502}})
            with contextlib.suppress(Exception):
                await resp.write(b"data: " + err + b"\n\ndata: [DONE]\n\n")
                await resp.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            status = "client_gone"
            await self._event(route, "finished", pod, ttft_s=ttft, status=status)
            raise
        out, cached = _usage_of_stream(tail)
        await self._event(route, "finished", pod, ttft_s=ttft, output_tokens=out,
                          cached_tokens=cached, status=status)
        return resp


def _usage_of(data: bytes) -> tuple[int, int]:
    try:
        u = _usage_decoder.decode(data).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return 0, 0
    if u is None:
        return 0, 0
    details = u.prompt_tokens_details
    return u.completion_tokens, (details.cached_tokens or 0) if details else 0


def _usage_of_stream(tail: bytes) -> tuple[int, int]:
    found = _USAGE_RE.findall(tail)
    return _usage_of(found[-1]) if found else (0, 0)
