"""The autoscaler service: desired replicas per pool, decided every ``interval_s`` and published
on ``im.scale.<pool>`` (a :class:`ScaleDecision`, with its reason and inputs), and exported as
Prometheus gauges.

It reads only the bus: every pod's heartbeat (``im.pod.*.*``: ready replicas, KV usage, queues),
every request event (``im.req.*``: arrivals, TTFT, ITL, the pool's last request) and the
ingresses' demand (``ScaleDemand`` on ``im.scale.*``: requests held for a pool with no ready
pod). The decision itself is :mod:`infermesh.libs.autoscaling`; an actuator (the local
supervisor, or KEDA through the external scaler) acts on what is published.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from infermesh.libs.autoscaling import (
    Inputs,
    PoolDecider,
    ReplicaLoad,
    SLOWindow,
    analyze,
)
from infermesh.libs.bus import BUS_REGISTRY, cancel_tasks, connect, release, settle
from infermesh.libs.bus.lease import Lease
from infermesh.libs.scheduling.state import PodTable
from infermesh.libs.telemetry import get_logger
from infermesh.libs.telemetry.ops import OpsServer
from infermesh.proto import codec
from infermesh.proto.messages import PodState, RequestEvent, ScaleDecision, ScaleDemand
from infermesh.proto.subjects import Subjects, check_token

from .config import AutoscalerConfig
from .metrics import AutoscalerMetrics

log = get_logger("autoscaler")


class _Kind(msgspec.Struct):
    kind: str = ""


_kind_decoder = msgspec.msgpack.Decoder(_Kind)


class _Pool:
    """What the autoscaler knows of one pool."""

    def __init__(self, name: str, cfg: AutoscalerConfig) -> None:
        self.name = name
        self.model = ""
        self.decider = PoolDecider(cfg.bounds(name), cfg.slo_targets(name))
        self.saturation = cfg.saturation_model(name)  # its thresholds (pool_overrides)
        self.window = SLOWindow(cfg.slo_window_s)
        self.demand: dict[str, tuple[float, ScaleDemand]] = {}  # ingress replica → (arrived, msg)
        self.last_request = time.monotonic()  # a pool starts as if just used: no early zero
        self.open: set[str] = set()  # requests routed, not finished (bounded by the window's)
        self.followed_at = float("-inf")  # when the leader's last decision was heard

    def held(self, now: float, timeout_s: float) -> int:
        """Requests the ingresses hold for this pool (fresh demand only)."""
        for k in [k for k, (t, _) in self.demand.items() if now - t > timeout_s]:
            del self.demand[k]
        return sum(d.queued for _, d in self.demand.values())


class AutoscalerService:
    """One autoscaler replica. ``await start()``, then ``await stop()``."""

    def __init__(self, cfg: AutoscalerConfig, nc: Client | None = None) -> None:
        self.cfg = cfg
        self.subjects = Subjects(cfg.subject_prefix)
        self.replica = f"{socket.gethostname()}-{os.getpid()}"
        self.pods = PodTable(cfg.pod_timeout_s, late_s=cfg.pod_late_s)
        self.pools: dict[str, _Pool] = {}
        for name in cfg.pools:
            self._pool(check_token(name, "pool"))
        self.metrics = AutoscalerMetrics()
        self.decisions: dict[str, ScaleDecision] = {}  # the one in effect per pool
        self.lease: Lease | None = None  # None: lease off, this replica always publishes
        self._leading = False  # the lease's verdict at the last step
        self._nc = nc
        self._own_nc = nc is None
        self._subs: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._ops: OpsServer | None = None
        self.http_port: int | None = None
        self._keda: Any = None  # grpc.aio.Server of the KEDA external scaler
        self.keda_port: int | None = None
        self.started = time.monotonic()

    def _pool(self, name: str) -> _Pool:
        p = self.pools.get(name)
        if p is None:
            p = self.pools[name] = _Pool(name, self.cfg)
        return p

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, follow the bus, and start deciding."""
        if self._nc is None:
            self._nc = await connect(self.cfg.nats_url, "autoscaler",
                                     security=self.cfg.bus_security())
        nc = self._nc
        s = self.subjects
        self._subs = [
            await nc.subscribe(s.pod_state_all, cb=self._on_pod_state),
            await nc.subscribe(s.req_all, cb=self._on_request_event),
            await nc.subscribe(s.scale_all, cb=self._on_scale),
        ]
        await settle(nc)
        self.started = time.monotonic()
        self.metrics.leader.set(0 if self.cfg.lease else 1)
        if self.cfg.lease:
            self.lease = Lease(nc, s.autoscaler_lease_bucket, LEASE_KEY, self.replica,
                               ttl_s=self.cfg.lease_ttl_s, replicas=self.cfg.lease_replicas)
            await self.lease_step()  # the first one now: a lone replica leads from the start
            self._tasks.append(asyncio.create_task(self._lease_loop(), name="autoscaler-lease"))
        self._tasks.append(asyncio.create_task(self._loop(), name="autoscaler-loop"))
        if self.cfg.http_port >= 0:
            self._ops = OpsServer([self.metrics.registry, BUS_REGISTRY], self._health)
            self.http_port = await self._ops.start(self.cfg.http_host, self.cfg.http_port)
        if self.cfg.keda_port >= 0:
            from .keda.server import serve

            self._keda, self.keda_port = await serve(
                lambda: self.decisions, self.cfg.keda_host, self.cfg.keda_port,
                poll_s=min(0.5, self.cfg.interval_s))
        log.info("autoscaler_started", mode=self.cfg.mode, pools=sorted(self.pools),
                 replica=self.replica, lease=self.cfg.lease,
                 min_replicas=self.cfg.min_replicas, max_replicas=self.cfg.max_replicas,
                 http_port=self.http_port, keda_port=self.keda_port)

    async def stop(self) -> None:
        """Stop deciding and everything this replica started."""
        await cancel_tasks(self._tasks)
        self._tasks = []
        if self.lease is not None:
            await self.lease.release()  # the next replica takes over at once
        if self._keda is not None:
            with contextlib.suppress(Exception):
                await self._keda.stop(grace=0.5)
            self._keda = None
        await release(subs=self._subs, ops=self._ops, nc=self._nc if self._own_nc else None)
        self._subs, self._ops = [], None

    def _health(self) -> tuple[bool, dict[str, Any]]:
        ok = self._nc is not None and self._nc.is_connected
        lease = self.lease.state if self.lease is not None else None
        return ok, {
            "mode": self.cfg.mode,
            "replica": self.replica,
            "role": "leader" if self.is_leader() else "follower",
            "lease_holder": lease.holder if lease else self.replica,
            "lease_error": lease.error if lease else "",
            "pools": {name: {"desired": d.target_replicas, "ready": d.ready_replicas,
                             "reason": d.reason} for name, d in self.decisions.items()},
        }

    # ------------------------------------------------------------------ the bus

    async def _on_pod_state(self, msg: Msg) -> None:
        try:
            st = codec.decode(msg.data, PodState)
            check_token(st.pool, "pool")
        except (codec.DecodeError, ValueError):
            self.metrics.messages.labels("pod_state", "bad").inc()
            return
        self.metrics.messages.labels("pod_state", "ok").inc()
        pool = self._pool(st.pool)
        pool.model = st.model or pool.model
        self.pods.update(st)

    async def _on_request_event(self, msg: Msg) -> None:
        try:
            ev = codec.decode(msg.data, RequestEvent)
            check_token(ev.pool, "pool")
        except (codec.DecodeError, ValueError):
            self.metrics.messages.labels("request_event", "bad").inc()
            return
        self.metrics.messages.labels("request_event", "ok").inc()
        self.apply_event(ev, time.monotonic())

    def apply_event(self, ev: RequestEvent, now: float) -> None:
        """Follow one request event."""
        pool = self._pool(ev.pool)
        pool.model = pool.model or ev.model
        pool.last_request = now
        w = pool.window
        if ev.kind == "routed":
            w.routed(now, ev.request_id, ev.ts)
            if len(pool.open) < 65536:
                pool.open.add(ev.request_id)
        elif ev.kind == "first_token":
            if ev.ttft_s is not None:
                # Without the time the activator held it for a first engine: more replicas
                # would not have shortened that (the scale from zero did).
                w.first_token(now, ev.request_id, max(0.0, ev.ttft_s - max(0.0, ev.held_s)))
        else:
            pool.open.discard(ev.request_id)
            w.finished(now, ev.request_id, ev.ts, ev.output_tokens, ev.status == "ok")

    async def _on_scale(self, msg: Msg) -> None:
        try:
            kind = _kind_decoder.decode(msg.data).kind
            if kind == "decision":
                self._follow(codec.decode(msg.data, ScaleDecision))
                return
            d = codec.decode(msg.data, ScaleDemand)
            check_token(d.pool, "pool")
        except (msgspec.DecodeError, codec.DecodeError, ValueError):
            self.metrics.messages.labels("scale_demand", "bad").inc()
            return
        self.metrics.messages.labels("scale_demand", "ok").inc()
        now = time.monotonic()
        pool = self._pool(d.pool)
        pool.model = pool.model or d.model
        pool.demand[_source(d)] = (now, d)
        if d.queued or d.in_flight:
            pool.last_request = now

    def _follow(self, d: ScaleDecision) -> None:
        """Another replica's decision: a follower adopts it (the leader's is the one in
        effect); a leader ignores it."""
        check_token(d.pool, "pool")
        if d.replica == self.replica:
            return  # our own
        self.metrics.messages.labels("scale_decision", "ok").inc()
        if self.is_leader():
            log.warning("decision_from_another_replica", pool=d.pool, replica=d.replica)
            return
        now = time.monotonic()
        pool = self._pool(d.pool)
        pool.model = pool.model or d.model
        pool.followed_at = now
        pool.decider.follow(now, d.target_replicas)
        self._export(d)

    # ------------------------------------------------------------------ the lease

    def is_leader(self) -> bool:
        """Whether this replica publishes decisions now."""
        return self.lease is None or self.lease.is_leader(time.monotonic())

    async def _lease_loop(self) -> None:
        assert self.lease is not None
        while True:
            await asyncio.sleep(self.cfg.lease_ttl_s / 3)
            await self.lease_step()

    async def lease_step(self) -> bool:
        """Renew, take or watch the lease once; whether this replica leads after it."""
        assert self.lease is not None
        was = self._leading
        try:
            leader = await self.lease.step(time.monotonic())
        except Exception:  # a bug in one step must not end the lease loop
            log.exception("autoscaler_lease_step_failed")
            leader = self.is_leader()
        if self.lease.state.error:
            self.metrics.lease_errors.inc()
        self._leading = leader
        if leader != was:
            self.metrics.lease_changes.labels("acquired" if leader else "lost").inc()
            self.metrics.leader.set(1 if leader else 0)
            log.info("autoscaler_leader" if leader else "autoscaler_follower",
                     replica=self.replica, holder=self.lease.state.holder or None)
        return leader

    # ------------------------------------------------------------------ deciding

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a bug in one tick must not stop the autoscaler for good
                log.exception("autoscaler_tick_failed")
            await asyncio.sleep(self.cfg.interval_s)

    async def tick(self, now: float | None = None) -> list[ScaleDecision]:
        """Decide every pool once and publish the decisions."""
        now = time.monotonic() if now is None else now
        if now - self.started < self.cfg.warmup_s:
            return []  # the running pods' heartbeats are still arriving
        for gone in self.pods.prune():
            log.info("pod_no_longer_counted", pod=gone, reason="no heartbeat")
        out = [self.decide(pool, now) for pool in list(self.pools.values())]
        if not self.is_leader():
            return []  # a follower decides in the shadow of the leader, and publishes nothing
        if self._nc is not None:
            for d in out:
                with contextlib.suppress(Exception):  # best effort; the next tick says it again
                    await self._nc.publish(self.subjects.scale(d.pool), codec.encode(d))
        return out

    def decide(self, pool: _Pool, now: float) -> ScaleDecision:
        """One pool's decision now (no I/O)."""
        cfg = self.cfg
        ready = self.pods.pods(pool.name)
        sat = analyze(pool.saturation, (ReplicaLoad(p.kv_usage, p.waiting, p.running)
                                   for p in ready))
        held = pool.held(now, cfg.demand_timeout_s)
        busy = bool(pool.open) or held > 0
        idle_s = 0.0 if busy else max(0.0, now - pool.last_request)
        slo = pool.window.view(now, pool.decider.targets) if cfg.mode == "slo" else None
        d = pool.decider.tick(now, Inputs(ready=len(ready), saturation=sat, slo=slo,
                                          queued=held, idle_s=idle_s))
        inputs: dict[str, float] = {
            "spare_kv": sat.spare_kv, "spare_queue": sat.spare_queue,
            "saturated": float(sat.saturated), "needed": float(sat.needed),
            "kv_usage_sum": sat.total_kv, "waiting": float(sat.total_waiting),
            "queued": float(held), "idle_s": idle_s,
        }
        if slo is not None:
            inputs["arrival_rps"] = slo.arrival_rps
            inputs["completion_rps"] = slo.completion_rps
            if slo.ttft_p90_s is not None:
                inputs["ttft_p90_s"] = slo.ttft_p90_s
            if slo.itl_p90_s is not None:
                inputs["itl_p90_s"] = slo.itl_p90_s
        decision = ScaleDecision(
            pool=pool.name, model=pool.model, ts=time.time(), target_replicas=d.target,
            reason=d.reason, ready_replicas=len(ready), recommended=d.recommended,
            mode=cfg.mode, replica=self.replica, inputs=inputs,
        )
        # A follower's own decision is in effect only while no leader is heard (KEDA asking a
        # follower gets the leader's answer).
        if self.is_leader() or now - pool.followed_at > cfg.lease_ttl_s:
            self._export(decision)
        return decision

    def _export(self, decision: ScaleDecision) -> None:
        """Make ``decision`` the one in effect: answers (KEDA, /health) and gauges."""
        name = decision.pool
        previous = self.decisions.get(name)
        self.decisions[name] = decision
        m = self.metrics
        m.desired.labels(name).set(decision.target_replicas)
        m.recommended.labels(name).set(decision.recommended)
        m.ready.labels(name).set(decision.ready_replicas)
        for k, v in decision.inputs.items():
            if k in m.inputs:
                m.inputs[k].labels(name).set(v)
        if previous is not None and previous.target_replicas != decision.target_replicas:
            direction = "up" if decision.target_replicas > previous.target_replicas else "down"
            m.decisions.labels(name, direction).inc()
            log.info("scale_decision", pool=name, target=decision.target_replicas,
                     was=previous.target_replicas, ready=decision.ready_replicas,
                     reason=decision.reason, by=decision.replica)


LEASE_KEY = "leader"


def _source(d: ScaleDemand) -> str:
    """Whose demand a message is: one entry per ingress replica (a newer message replaces it)."""
    return d.replica or "-"
