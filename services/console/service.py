"""The fleet console service: follows the bus and serves the live page.

It subscribes, as a reader only, to every pod's heartbeat (``im.pod.*.*``), every request event
(``im.req.*``) and every scale message (``im.scale.*``: the autoscaler's decisions and the
ingresses' demand), keeps a bounded :class:`~.view.FleetView`, and serves over HTTP:

* ``GET /console``: the page (one self-contained HTML file, no outside resources);
* ``GET /console/events``: server-sent events, a full snapshot on connect and then one after
  changes, at most ``updates_per_s`` a second. Each browser has a queue of one: a slow browser
  skips snapshots (a newer one replaces the unread one), it never holds up the bus;
* ``GET /console/state``: the same snapshot as JSON, once;
* ``GET /health`` and ``GET /metrics``.

Both data endpoints take ``pool`` (that pool only) and ``decisions`` (how many of the latest
routing decisions); a bad value is an OpenAI-style 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg

from infermesh.libs.bus import BUS_REGISTRY, cancel_tasks, connect, release, settle
from infermesh.libs.telemetry import get_logger
from infermesh.libs.telemetry.ops import OpsServer
from infermesh.proto import codec
from infermesh.proto.messages import PodState, RequestEvent, ScaleDecision, ScaleDemand
from infermesh.proto.subjects import Subjects, check_token

from .config import ConsoleConfig
from .metrics import ConsoleMetrics
from .view import FleetView

log = get_logger("console")

PAGE = Path(__file__).with_name("page.html")
QUERY_PARAMS = ("pool", "decisions")
# Snapshots are pushed at least this often while browsers follow, so ages and the chart move
# on an idle fleet too.
IDLE_PUSH_S = 1.0

_Key = tuple[str | None, int | None]  # (pool, decisions) a browser asked for


class _Kind(msgspec.Struct):
    kind: str = ""


_kind_decoder = msgspec.msgpack.Decoder(_Kind)
_json = msgspec.json.Encoder()


class BadQuery(Exception):
    """A query parameter the console cannot serve."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def error_response(status: int, message: str, param: str | None = None) -> web.Response:
    """``{"error": {"message", "type", "param", "code"}}``, as the OpenAI API answers."""
    kind = {400: "invalid_request_error", 503: "service_unavailable"}.get(status, "error")
    return web.json_response({"error": {"message": message, "type": kind, "param": param,
                                        "code": status}}, status=status)


def parse_query(query: Any, max_decisions: int) -> _Key:
    """(pool, decisions) from a request's query; raises :class:`BadQuery`."""
    for name in query:
        if name not in QUERY_PARAMS:
            raise BadQuery(f"unknown query parameter {name!r} (known: "
                           f"{', '.join(QUERY_PARAMS)})", name)
    pool = query.get("pool") or None
    if pool is not None:
        try:
            check_token(pool, "pool")
        except ValueError as e:
            raise BadQuery(str(e), "pool") from None
    raw = query.get("decisions")
    decisions: int | None = None
    if raw is not None:
        try:
            decisions = int(raw)
        except ValueError:
            decisions = -1
        if not 0 <= decisions <= max_decisions:
            raise BadQuery(f"decisions must be an integer within 0..{max_decisions}, got "
                           f"{raw!r}", "decisions")
    return pool, decisions


class _Follower:
    """One browser on /console/events: what it asked for, and its one-snapshot queue."""

    def __init__(self, key: _Key) -> None:
        self.key = key
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)
        self.task = asyncio.current_task()

    def offer(self, frame: bytes | None) -> bool:
        """Queue ``frame`` (None: the stream ends); False when it replaced an unread one."""
        replaced = False
        if self.queue.full():
            self.queue.get_nowait()
            replaced = True
        self.queue.put_nowait(frame)
        return not replaced


class ConsoleService:
    """The console. ``await start()``, then ``await stop()``."""

    def __init__(self, cfg: ConsoleConfig, nc: Client | None = None) -> None:
        self.cfg = cfg
        self.subjects = Subjects(cfg.subject_prefix)
        self.metrics = ConsoleMetrics()
        self.view = FleetView(pod_timeout_s=cfg.pod_timeout_s, pod_late_s=cfg.pod_late_s,
                              decisions=cfg.decisions, history_s=cfg.history_s,
                              demand_timeout_s=cfg.demand_timeout_s)
        self.page = PAGE.read_bytes()
        self._nc = nc
        self._own_nc = nc is None
        self._subs: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._followers: set[_Follower] = set()
        self._ops: OpsServer | None = None
        self.http_port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, follow the bus, serve the page."""
        if self._nc is None:
            self._nc = await connect(self.cfg.nats_url, "console",
                                     security=self.cfg.bus_security())
        nc, s = self._nc, self.subjects
        self._subs = [
            await nc.subscribe(s.pod_state_all, cb=self._on_pod_state),
            await nc.subscribe(s.req_all, cb=self._on_request_event),
            await nc.subscribe(s.scale_all, cb=self._on_scale),
        ]
        await settle(nc)
        self._tasks.append(asyncio.create_task(self._push_loop(), name="console-push"))
        self._ops = OpsServer([self.metrics.registry, BUS_REGISTRY], self._health, routes=[
            web.get("/", self._root),
            web.get("/console", self._guard(self._page)),
            web.get("/console/state", self._guard(self._state)),
            web.get("/console/events", self._guard(self._events)),
        ])
        self.http_port = await self._ops.start(self.cfg.http_host, self.cfg.http_port)
        log.info("console_started", url=self.url)

    @property
    def url(self) -> str:
        """The page's URL."""
        return f"http://{self.cfg.http_host}:{self.http_port}/console"

    def ready_detail(self) -> dict[str, Any]:
        """What the ready file says besides the HTTP URL."""
        return {"console_url": self.url}

    async def stop(self) -> None:
        """End every event stream, stop following the bus, stop serving."""
        await cancel_tasks(self._tasks)
        self._tasks = []
        for f in list(self._followers):
            f.offer(None)
        waiting = [f.task for f in self._followers if f.task is not None]
        if waiting:  # a browser that does not read may hold its handler in a write
            _, stuck = await asyncio.wait(waiting, timeout=0.5)
            for t in stuck:
                t.cancel()
        await release(subs=self._subs, ops=self._ops, nc=self._nc if self._own_nc else None)
        self._subs, self._ops = [], None

    def _health(self) -> tuple[bool, dict[str, Any]]:
        ok = self._nc is not None and self._nc.is_connected
        return ok, {"pods": len(self.view.pods), "followers": len(self._followers)}

    # ------------------------------------------------------------------ the bus

    async def _on_pod_state(self, msg: Msg) -> None:
        try:
            st = codec.decode(msg.data, PodState)
            check_token(st.pool, "pool")
            check_token(st.pod, "pod")
        except (codec.DecodeError, ValueError):
            self.metrics.messages.labels("pod_state", "bad").inc()
            return
        self.metrics.messages.labels("pod_state", "ok").inc()
        self.view.on_pod_state(st)

    async def _on_request_event(self, msg: Msg) -> None:
        try:
            ev = codec.decode(msg.data, RequestEvent)
            check_token(ev.pool, "pool")
        except (codec.DecodeError, ValueError):
            self.metrics.messages.labels("request_event", "bad").inc()
            return
        self.metrics.messages.labels("request_event", "ok").inc()
        self.view.on_request_event(ev)

    async def _on_scale(self, msg: Msg) -> None:
        try:
            if _kind_decoder.decode(msg.data).kind == "decision":
                d = codec.decode(msg.data, ScaleDecision)
                check_token(d.pool, "pool")
                self.view.on_scale_decision(d)
                kind = "scale_decision"
            else:
                dm = codec.decode(msg.data, ScaleDemand)
                check_token(dm.pool, "pool")
                self.view.on_scale_demand(dm)
                kind = "scale_demand"
        except (msgspec.DecodeError, codec.DecodeError, ValueError):
            self.metrics.messages.labels("scale", "bad").inc()
            return
        self.metrics.messages.labels(kind, "ok").inc()

    # ------------------------------------------------------------------ pushing

    def frame(self, key: _Key) -> bytes:
        """One server-sent event holding the snapshot ``key`` asks for."""
        return b"data: " + _json.encode(self.view.snapshot(*key)) + b"\n\n"

    async def _push_loop(self) -> None:
        period = 1.0 / self.cfg.updates_per_s
        pushed_version, pushed_at = -1, 0.0
        while True:
            await asyncio.sleep(period)
            try:
                for pod in self.view.prune():
                    log.info("pod_left_console", pod=pod)
                self.metrics.pods.set(len(self.view.pods))
                now = time.monotonic()
                if not self._followers or (self.view.version == pushed_version
                                           and now - pushed_at < IDLE_PUSH_S):
                    continue
                pushed_version, pushed_at = self.view.version, now
                frames: dict[_Key, bytes] = {}
                for f in list(self._followers):
                    if f.key not in frames:
                        frames[f.key] = self.frame(f.key)
                    if not f.offer(frames[f.key]):
                        self.metrics.skipped.inc()
                    self.metrics.updates.inc()
            except Exception:  # a bug in one push must not stop the console for good
                log.exception("console_push_failed")

    # ------------------------------------------------------------------ HTTP

    def _guard(self, handler: Callable[[web.Request, _Key], Awaitable[web.StreamResponse]]
               ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """The query checked first: a bad one is a 400 naming the parameter."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                key = parse_query(request.query, self.cfg.decisions)
            except BadQuery as e:
                self.metrics.refused.labels("400").inc()
                return error_response(400, e.message, e.param)
            return await handler(request, key)

        return guarded

    async def _root(self, _: web.Request) -> web.Response:
        raise web.HTTPFound("/console")

    async def _page(self, _: web.Request, __: _Key) -> web.Response:
        return web.Response(body=self.page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def _state(self, _: web.Request, key: _Key) -> web.Response:
        return web.Response(body=_json.encode(self.view.snapshot(*key)),
                            content_type="application/json")

    async def _events(self, request: web.Request, key: _Key) -> web.StreamResponse:
        if len(self._followers) >= self.cfg.max_clients:
            self.metrics.refused.labels("503").inc()
            return error_response(503, f"the console serves at most {self.cfg.max_clients} "
                                  "event streams at once; close one, or raise max_clients")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        follower = _Follower(key)
        self._followers.add(follower)
        self.metrics.clients.set(len(self._followers))
        try:
            await resp.write(b"retry: 1000\n" + self.frame(key))
            while True:
                try:
                    frame = await asyncio.wait_for(follower.queue.get(), self.cfg.keepalive_s)
                except TimeoutError:
                    frame = b": keep-alive\n\n"
                if frame is None:
                    break
                await resp.write(frame)
        except (ConnectionResetError, ConnectionError):
            pass  # the browser went away
        finally:
            self._followers.discard(follower)
            self.metrics.clients.set(len(self._followers))
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp
