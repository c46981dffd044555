"""The local actuator (`infermesh up --autoscale`): the autoscaler's decisions for the plan's
pool, carried out on the engine slots of the plan.

The plan lays out as many engine slots (an engine and its agent) as the autoscaler may ask for;
those past ``engines`` start parked. This thread follows ``im.scale.<pool>`` decisions and the
pool's heartbeats, and converges: while fewer slots run than the target, the lowest parked one
starts; while more run, the highest running one is drained — its agent's ``POST /drain`` makes
its heartbeats say ``ready: false`` (with the label ``draining``), so ingresses and schedulers
stop sending it requests — and stopped once its engine has nothing running or waiting (or after
``drain_timeout_s``). A slot that was never started, or stopped, is parked again. When the target
rises while slots still drain, those are taken back first (``POST /undrain``: a warm engine, its
cache known to the indexes, instead of a cold start), the most recently drained first.

Processes started here are children of this thread (their ``PR_SET_PDEATHSIG`` fires when it
ends), so the thread lives as long as the system.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from infermesh.libs.bus import connect
from infermesh.libs.telemetry import get_logger
from infermesh.proto import codec
from infermesh.proto.messages import PodState, ScaleDecision
from infermesh.proto.subjects import Subjects

if TYPE_CHECKING:
    from .run import LocalSystem

log = get_logger("system.actuator")

# A drained engine idle this long (heartbeats, every 0.2 s, saying nothing runs or waits) is
# stopped.
DRAIN_IDLE_S = 0.5
DRAIN_TIMEOUT_S = 120.0


@dataclass
class Slot:
    """One engine slot: its pod, its processes (engine first) and its agent's drain URL."""

    index: int
    pod: str
    procs: list[str]
    drain_url: str  # the agent's POST /drain (``/undrain`` beside it)
    running: bool = False
    draining_since: float | None = None
    idle_since: float | None = None
    history: list[tuple[float, str]] = field(default_factory=list)  # (when, what)


class LocalActuator:
    """Converges the plan's engine slots on the autoscaler's target (a thread of its own)."""

    def __init__(self, system: LocalSystem, *, interval_s: float = 0.2,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        self.system = system
        plan = system.plan
        self.pool = plan.spec.pool
        self.subjects = Subjects(plan.spec.subject_prefix)
        self.interval_s = interval_s
        self.drain_timeout_s = drain_timeout_s
        self.slots: list[Slot] = []
        for i, pod in enumerate(plan.pods):
            procs = [p for p in plan.processes if pod in p.pods]
            procs.sort(key=lambda p: p.stage)  # the engine, then its agent
            agent = next((p for p in procs if p.kind == "agent"), None)
            metrics = agent.links.get("metrics", "") if agent else ""
            drain = metrics[: -len("/metrics")] + "/drain" if metrics else ""
            self.slots.append(Slot(i, pod, [p.name for p in procs], drain,
                                   running=not procs[0].parked))
        self.target: int | None = None
        self.states: dict[str, PodState] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="actuator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:  # a bug here must be seen; the system keeps what runs
            log.exception("actuator_failed")

    async def _main(self) -> None:
        nc = await connect(self.system.plan.nats_url, "actuator",
                           security=self.system.security())
        try:
            await nc.subscribe(self.subjects.scale(self.pool), cb=self._on_scale)
            await nc.subscribe(f"{self.subjects.prefix}.pod.{self.pool}.*", cb=self._on_pod)
            while not self._stop.is_set():
                try:
                    self.step()  # here: the processes it starts are this thread's children
                except Exception:  # one failed step must not end the actuator
                    log.exception("actuator_step_failed")
                await asyncio.sleep(self.interval_s)
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _on_scale(self, msg: Any) -> None:
        if b"decision" not in msg.data:
            return  # an ingress's demand
        try:
            d = codec.decode(msg.data, ScaleDecision)
        except codec.DecodeError:
            return
        if d.pool == self.pool:
            self.target = d.target_replicas

    async def _on_pod(self, msg: Any) -> None:
        try:
            st = codec.decode(msg.data, PodState)
        except codec.DecodeError:
            return
        with self._lock:
            self.states[st.pod] = st

    # ------------------------------------------------------------------ converging

    @property
    def running(self) -> list[Slot]:
        """Slots started and not draining."""
        return [s for s in self.slots if s.running and s.draining_since is None]

    def step(self) -> None:
        """One convergence step (blocking: starts and stops processes)."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.draining_since is not None:
                self._check_drain(slot, now)
        target = self.target
        if target is None:
            return
        target = max(0, min(target, len(self.slots)))
        live = self.running
        if len(live) < target:
            missing = target - len(live)
            draining = sorted((s for s in self.slots if s.draining_since is not None),
                              key=lambda s: -(s.draining_since or 0.0))
            for slot in draining[:missing]:
                if self._undrain(slot, now):
                    missing -= 1
            for slot in [s for s in self.slots if not s.running][:missing]:
                self._start(slot, now)
        elif len(live) > target:
            for slot in sorted(live, key=lambda s: -s.index)[: len(live) - target]:
                self._drain(slot, now)

    def _start(self, slot: Slot, now: float) -> None:
        log.info("engine_starting", pod=slot.pod, target=self.target)
        with self._lock:
            self.states.pop(slot.pod, None)
        for name in slot.procs:
            self.system.supervisor.start(name)
        slot.running = True
        slot.history.append((now, "started"))

    def _drain(self, slot: Slot, now: float) -> None:
        log.info("engine_draining", pod=slot.pod, target=self.target)
        slot.draining_since = now
        slot.idle_since = None
        slot.history.append((now, "draining"))
        if not slot.drain_url:  # an agent without its ops port: stopped after the timeout
            log.warning("drain_impossible", pod=slot.pod, reason="the agent has no ops port")
            return
        try:
            req = urllib.request.Request(slot.drain_url, method="POST", data=b"")
            with urllib.request.urlopen(req, timeout=5):
                pass
        except OSError as e:  # no agent to ask: stop it after the timeout anyway
            log.warning("drain_request_failed", pod=slot.pod, error=str(e))

    def _undrain(self, slot: Slot, now: float) -> bool:
        """Take a draining slot back; False when its agent did not say yes (it drains on)."""
        if not slot.drain_url:
            return False
        try:
            req = urllib.request.Request(slot.drain_url[: -len("/drain")] + "/undrain",
                                         method="POST", data=b"")
            with urllib.request.urlopen(req, timeout=5):
                pass
        except OSError as e:
            log.warning("undrain_request_failed", pod=slot.pod, error=str(e))
            return False
        log.info("engine_undrained", pod=slot.pod, target=self.target,
                 drained_s=round(now - (slot.draining_since or now), 2))
        slot.draining_since = slot.idle_since = None
        slot.history.append((now, "undrained"))
        return True

    def _check_drain(self, slot: Slot, now: float) -> None:
        with self._lock:
            st = self.states.get(slot.pod)
        assert slot.draining_since is not None
        said = st is not None and "draining" in st.labels and st.ts > 0
        idle = said and st is not None and st.running == 0 and st.waiting == 0
        if idle:
            if slot.idle_since is None:
                slot.idle_since = now
        else:
            slot.idle_since = None
        done = slot.idle_since is not None and now - slot.idle_since >= DRAIN_IDLE_S
        if done or now - slot.draining_since >= self.drain_timeout_s:
            log.info("engine_stopping", pod=slot.pod, drained=done,
                     drain_s=round(now - slot.draining_since, 2))
            for name in reversed(slot.procs):  # the agent, then its engine
                self.system.supervisor.stop(name)
            slot.running = False
            slot.draining_since = slot.idle_since = None
            slot.history.append((now, "stopped" if done else "stopped after the drain timeout"))
