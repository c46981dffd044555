"""A scheduler replica's state and decisions, without the bus endpoint: the scheduler service
answers ``im.schedule`` with it, and an ingress that schedules itself (``schedule_here``) asks
it in its own process.

State comes from the bus only. Every replica subscribes to every pod's heartbeat
(``im.pod.*.*``) and to every request event (``im.req.*``), and counts its own decisions in
flight at once; replicas therefore agree on pods, load and routing history without talking to
each other, and any of them can answer any request.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from infermesh.libs.bus import cancel_tasks, release, settle
from infermesh.libs.bus import request as bus_request
from infermesh.libs.kvindex import IndexFollower, KVIndex, StreamTracker
from infermesh.libs.telemetry import get_logger
from infermesh.proto import codec
from infermesh.proto.messages import (
    LookupReply,
    LookupRequest,
    PodState,
    RequestEvent,
    ScheduleDecision,
    ScheduleRequest,
)
from infermesh.proto.subjects import Subjects

from .config import SchedulingKnobs, load_pipeline
from .framework import Handle, NoCandidates, Pipeline
from .metrics import SchedulerMetrics
from .plugins.precise_prefix_scorer import PrecisePrefixCacheScorer
from .scheduler import Scheduler, UnknownProfile, total_scores
from .state import InFlight, PodTable

log = get_logger("scheduler")


def prefill_request_id(request_id: str) -> str:
    """The id of a disaggregated request's prefill leg in request events (its own, so each
    engine's in-flight count holds one entry per leg)."""
    return f"{request_id}-prefill"


class ScheduleError(Exception):
    """A request the scheduler cannot place: ``status`` is the HTTP-like code (400, 503)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SchedulerCore:
    """One scheduler replica's state and decisions. ``await start(nc)``, ``await decide(req)``,
    ``await stop()``.

    The pipeline is built in the constructor, so a bad profiles file fails before anything
    connects.
    """

    def __init__(self, cfg: SchedulingKnobs, replica: str, subjects: Subjects,
                 pipeline: Pipeline | None = None, *, lazy_index: bool = False) -> None:
        self.cfg = cfg
        self.replica = replica
        self.subjects = subjects
        self.metrics = SchedulerMetrics()
        rng = random.Random(cfg.seed) if cfg.seed else random.Random()
        self.handle = Handle(self.metrics, self._index_lookup, rng)
        self.pipeline = pipeline or load_pipeline(cfg.profiles_file, self.handle)
        self.scheduler = Scheduler(self.pipeline, self.metrics)
        self.pods = PodTable(cfg.pod_timeout_s, late_s=cfg.pod_late_s)
        self.inflight = InFlight(cfg.inflight_timeout_s)
        self.observers = self.pipeline.observers()
        # Called after a request event ended a prefill or a request (the ingress's flow
        # control looks for room again).
        self.on_request_end: Callable[[], None] | None = None
        self.decisions = 0
        self._nc: Client | None = None
        self._subs: list[Any] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self.local_index: IndexFollower | None = None
        # lazy_index: the local index starts with the first lookup, not at start (a fallback
        # scheduler, asked only when the ingresses cannot decide, does not follow every KV
        # stream for nothing); the indexer service answers until it is in sync.
        self._lazy_index = lazy_index
        self._index_start: asyncio.Task[None] | None = None
        self._where = {w: self.metrics.index_where.labels(w) for w in ("local", "service")}

    async def start(self, nc: Client) -> None:
        """Follow the pool on ``nc``: heartbeats, request events, and the KV streams when a
        profile scores with the index (the local index)."""
        self._nc = nc
        self._subs = [
            await nc.subscribe(self.subjects.pod_state_all, cb=self._on_pod_state),
            await nc.subscribe(self.subjects.req_all, cb=self._on_request_event),
        ]
        if self._wants_index() and not self._lazy_index:
            await self._start_index()
        await settle(nc)
        self._tasks = [asyncio.create_task(self._housekeeping(), name="scheduler-housekeeping")]

    def _wants_index(self) -> bool:
        return self.cfg.local_index_max_pods > 0 and self._uses_index()

    async def _start_index(self) -> None:
        assert self._nc is not None
        index = KVIndex(self.cfg.local_index_max_blocks,
                        storage_ttl_s=self.cfg.local_index_storage_ttl_s,
                        storage_max_blocks=self.cfg.local_index_storage_max_blocks)
        tracker = StreamTracker(index,
                                pod_timeout_s=self.cfg.pod_timeout_s,
                                pod_late_s=self.cfg.pod_late_s)
        follower = IndexFollower(self._nc, self.subjects, tracker, snapshot_timeout_s=5.0,
                                 snapshot_part_blocks=4096, log_name="scheduler.index")
        await follower.start()
        self.local_index = follower
        log.info("local_index_started", replica=self.replica, lazy=self._lazy_index)

    async def stop(self) -> None:
        """Stop following the bus (idempotent; the connection stays open)."""
        if self._index_start is not None:
            self._tasks.append(self._index_start)
            self._index_start = None
        await cancel_tasks(self._tasks)
        self._tasks = []
        if self.local_index is not None:
            await self.local_index.stop()
            self.local_index = None
        await release(subs=self._subs)
        self._subs = []

    def health(self) -> dict[str, Any]:
        """What /health shows of this replica."""
        return {
            "replica": self.replica,
            "pods": len(self.pods),
            "pods_late": self.pods.late(),
            "inflight": self.inflight.counts(),
            "decisions": self.decisions,
            "profiles": sorted(self.pipeline.profiles),
            "default_profile": self.pipeline.default_profile,
        }

    async def _housekeeping(self) -> None:
        period = min(0.25, self.cfg.pod_late_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                self.prune()
            except Exception:  # a bug here must not stop pruning for good
                log.exception("housekeeping_failed")

    def prune(self) -> None:
        """Drop silent pods and expired in-flight requests; refresh the gauges."""
        for pod in self.pods.prune():
            log.warning("pod_dropped", pod=pod, reason="no heartbeat",
                        silent_s=self.cfg.pod_timeout_s)
            self._pod_removed(pod)
        expired = self.inflight.expire()
        if expired:
            self.metrics.inflight_expired.inc(expired)
        self.metrics.pods.set(len(self.pods))
        self.metrics.pods_late.set(self.pods.late())
        self.metrics.inflight.set(len(self.inflight))

    def _pod_removed(self, pod: str) -> None:
        for o in self.observers:
            o.on_pod_removed(pod)

    # ------------------------------------------------------------------ bus state

    async def _on_pod_state(self, msg: Msg) -> None:
        try:
            st = codec.decode(msg.data, PodState)
        except codec.DecodeError:
            self.metrics.bus_messages.labels("pod_state", "bad").inc()
            return
        self.metrics.bus_messages.labels("pod_state", "ok").inc()
        if self.pods.update(st):
            log.info("pod_dropped", pod=st.pod, reason="not ready")
            self._pod_removed(st.pod)

    async def _on_request_event(self, msg: Msg) -> None:
        try:
            ev = codec.decode(msg.data, RequestEvent)
        except codec.DecodeError:
            self.metrics.bus_messages.labels("request_event", "bad").inc()
            return
        self.metrics.bus_messages.labels("request_event", "ok").inc()
        self.apply_event(ev)

    def apply_event(self, ev: RequestEvent) -> None:
        """Follow one request event (from any replica's ingress, or this replica's decision)."""
        if ev.kind == "routed":
            if ev.pod:
                # A decode leg pulls its prompt's KV from the prefill engine: nothing to prefill.
                tokens = 0 if ev.leg == "decode" else ev.num_tokens
                self.inflight.routed(ev.request_id, ev.pod, num_tokens=tokens,
                                     cached_blocks=ev.cached_blocks if tokens else 0)
        elif ev.kind == "finished":
            self.inflight.finished(ev.request_id, ev.pod)
        else:
            self.inflight.touch(ev.request_id, ev.pod)
        for o in self.observers:
            o.on_request_event(ev)
        if ev.kind != "routed" and self.on_request_end is not None:
            self.on_request_end()

    # ------------------------------------------------------------------ im.schedule

    def _uses_index(self) -> bool:
        """Whether some profile scores with the KV index (else a local one would be waste)."""
        return any(isinstance(p, PrecisePrefixCacheScorer)
                   for p in self.pipeline.plugins.values())

    def _local_answers(self, pods: list[str] | None) -> bool:
        """Whether the local index may answer for ``pods``: the fleet is small enough, and each
        pod's stream is known and in sync (not waiting for a snapshot)."""
        f = self.local_index
        if f is None:
            return False
        streams = f.tracker.streams
        if len(streams) > self.cfg.local_index_max_pods:
            return False
        for name in pods if pods is not None else list(streams):
            s = streams.get(name)
            if s is None or s.syncing:
                return False
        return True

    async def _index_lookup(self, msg: LookupRequest, timeout: float) -> LookupReply:
        if (self.local_index is None and self._index_start is None and self._lazy_index
                and self._nc is not None and self._wants_index()):
            self._index_start = asyncio.create_task(self._start_index(), name="local-index")
        if self._local_answers(msg.pods):
            assert self.local_index is not None
            self._where["local"].inc()
            return LookupReply(matches=self.local_index.lookup(msg.block_keys, msg.pods))
        if self._nc is None:
            raise RuntimeError("not connected")
        self._where["service"].inc()
        return await bus_request(
            self._nc, self.subjects.index_lookup, msg, LookupReply, timeout=timeout
        )

    def _reject(self, code: int, reason: str, message: str) -> ScheduleError:
        self.metrics.rejections.labels(reason).inc()
        return ScheduleError(code, message)

    async def decide(self, req: ScheduleRequest) -> ScheduleDecision:
        """The pod for one request; raises :class:`ScheduleError` (400: a bad request or
        unknown profile; 503: no engine for it). With ``req.announce`` the routed event, keys
        included, is published here for every other replica."""
        if not req.request_id:
            raise self._reject(400, "bad_request", "request_id is required")
        if req.num_tokens < 0:
            raise self._reject(400, "bad_request", "num_tokens must be >= 0")
        try:
            profile = self.scheduler.profile_name(req)
        except UnknownProfile as e:
            known = ", ".join(sorted(self.pipeline.profiles))
            raise self._reject(
                400, "unknown_profile", f"unknown profile {e.args[0]!r} (known: {known})"
            ) from None
        pods, serving = self.pods.candidates(
            req.pool, req.model, req.exclude, req.labels, self.inflight.count,
            self.inflight.uncached_tokens,
        )
        if not pods:
            what = f"model {req.model!r} in pool {req.pool!r}"
            if serving == 0:
                message = f"no engine serves {what}"
            else:
                message = (
                    f"no engine left for {what}: {serving} serve it, "
                    f"none outside exclude={req.exclude} with labels {req.labels}"
                )
            raise self._reject(503, "no_engine", message)
        try:
            decision = await self.scheduler.schedule(req, pods)
        except NoCandidates as e:
            raise self._reject(503, "no_engine", f"{e} (model {req.model!r})") from None
        # Count it now, so the next decision (here) sees it before the ingress's routed event;
        # that event, for the same request id, is not counted twice.
        routed = RequestEvent(
            kind="routed",
            request_id=req.request_id,
            pod=decision.pod,
            pool=req.pool,
            model=req.model,
            ts=time.time(),
            replica=self.replica,
            num_tokens=req.num_tokens,
            block_keys=req.block_keys,
            profile=decision.profile,
            scores=total_scores(decision),
            cached_blocks=decision.cached_blocks,
            leg="decode" if decision.prefill_pod else "",
            session=req.session_id or "",
        )
        events = [routed]
        if decision.prefill_pod:
            # The prefill leg is in flight on its own engine, under its own id.
            events.append(RequestEvent(
                kind="routed", request_id=prefill_request_id(req.request_id),
                pod=decision.prefill_pod, pool=req.pool, model=req.model, ts=routed.ts,
                replica=self.replica, num_tokens=req.num_tokens, block_keys=req.block_keys,
                profile=decision.prefill_profile, leg="prefill"))
        for ev in events:
            self.apply_event(ev)
            if req.announce and self._nc is not None:
                # The other replicas learn the decision, keys included, from here.
                try:
                    await self._nc.publish(self.subjects.req(req.pool), codec.encode(ev))
                except Exception as e:  # noqa: BLE001 - events are best effort, the answer is not
                    log.debug("routed_event_failed", error=repr(e))
        self.decisions += 1
        self.metrics.decisions.labels(profile, decision.pod).inc()
        return decision
