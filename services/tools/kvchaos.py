"""`infermesh chaos`: a lossy hop between agents and the bus, for testing how loss is repaired.

Agents publish under one prefix (``--from-prefix``, e.g. ``raw``); every other service listens
under another (``--to-prefix``, ``im``). The hop forwards

* ``raw.kv.<pool>.<pod>`` → ``im.kv.<pool>.<pod>`` (KV event batches), with faults: a batch may be
  dropped, sent twice (the copy possibly a few batches later), or held back and sent after the
  next ``reorder_depth`` batches of the same pod;
* ``raw.pod.<pool>.<pod>`` → ``im.pod.<pool>.<pod>`` (heartbeats), unchanged;
* ``im.snapshot.<pod>`` → ``raw.snapshot.<pod>`` (snapshot requests), keeping the reply
  subject, so the agent's multi-part answer goes straight back to whoever asked; with
  ``block_snapshots`` the request is refused instead (a 503 service error).

Payloads are forwarded as they are: the hop decides by subject and dice, like a lossy network,
and never decodes a batch. The dice of each pod are seeded from ``seed`` and the pod name, so a
pod's stream meets the same faults run after run. Faults can be changed while running by a request
on ``<to-prefix>.chaos.control``; switching every fault off releases the held-back batches (so does
shutting down). Counters are served on /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from infermesh.libs.bus import BUS_REGISTRY, BusService, connect, release, reply_error, settle
from infermesh.libs.bus.security import BusClientKnobs
from infermesh.libs.config import add_arguments, knob, load_config
from infermesh.libs.telemetry import configure_logging, get_logger
from infermesh.libs.telemetry.ops import OpsServer, run_until_stopped
from infermesh.proto.subjects import DEFAULT_PREFIX, Subjects

log = get_logger("chaos")

FAULTS = ("drop", "duplicate", "reorder")

# Same reasoning as the indexer's: a burst must queue here, not be lost as a slow consumer,
# or the counters would not tell every batch that went missing.
_PENDING_MSGS = 1_000_000
_PENDING_BYTES = 1 << 30

_ERROR_HEADERS = {"Nats-Service-Error-Code": "503",
                  "Nats-Service-Error": "snapshot requests are blocked by the chaos hop"}


def _check_odds(drop: float, duplicate: float, reorder: float) -> None:
    for name, p in (("drop", drop), ("duplicate", duplicate), ("reorder", reorder)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability within [0, 1], not {p!r}")
    if drop + duplicate + reorder > 1.0 + 1e-9:
        raise ValueError("drop + duplicate + reorder must not exceed 1 (one fault per batch)")


@dataclass
class ChaosConfig(BusClientKnobs):
    """Every knob of `infermesh chaos`."""

    nats_url: str = knob("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated")
    from_prefix: str = knob("raw", "Prefix the agents publish under (their --subject-prefix)")
    to_prefix: str = knob(DEFAULT_PREFIX, "Prefix the indexers and every other service use")
    drop: float = knob(0.0, "Probability that a KV batch is dropped")
    duplicate: float = knob(0.0, "Probability that a KV batch is sent twice")
    reorder: float = knob(
        0.0, "Probability that a KV batch is held back and sent after later batches of its pod"
    )
    reorder_depth: int = knob(1, "Batches of the same pod that overtake a held-back batch")
    duplicate_delay: int = knob(
        0, "The copy of a duplicated batch follows up to this many later batches (0: at once)"
    )
    block_snapshots: bool = knob(
        False, "Refuse snapshot requests (503) instead of passing them to the agents"
    )
    seed: int = knob(0, "Seed of the fault dice (with the pod name: one sequence per pod)")
    control_subject: str = knob(
        "",
        "Request/reply subject that changes faults at runtime (empty: <to-prefix>.chaos.control)",
    )
    http_host: str = knob("127.0.0.1", "Address of the hop's /health and /metrics")
    http_port: int = knob(0, "Port of /health and /metrics (0: a free port, -1: none)")

    def __post_init__(self) -> None:
        for prefix in (self.from_prefix, self.to_prefix):
            Subjects(prefix)  # refuses a prefix that is not subject tokens
        if self.from_prefix == self.to_prefix:
            raise ValueError("from_prefix and to_prefix must differ (the hop would feed itself)")
        _check_odds(self.drop, self.duplicate, self.reorder)
        if self.reorder_depth < 1:
            raise ValueError("reorder_depth must be at least 1")
        if self.duplicate_delay < 0:
            raise ValueError("duplicate_delay must be >= 0")


class ChaosControl(msgspec.Struct, kw_only=True):
    """A request on the control subject: the fields given replace the current settings."""

    drop: float | None = None
    duplicate: float | None = None
    reorder: float | None = None
    block_snapshots: bool | None = None
    flush: bool = False  # release every held-back batch now


class ChaosStatus(msgspec.Struct, kw_only=True):
    """The answer to a control request: settings and counters after it."""

    drop: float
    duplicate: float
    reorder: float
    block_snapshots: bool
    held: int
    counts: dict[str, int]


@dataclass
class ChaosStats:
    """What the hop did, as plain counters (turned into metrics when /metrics is scraped)."""

    received: int = 0  # KV batches from agents
    forwarded: int = 0  # KV messages sent on (copies included)
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0  # batches held back
    released: int = 0  # held-back messages sent by a flush (faults off, explicit, shutdown)
    heartbeats: int = 0
    snapshots_forwarded: int = 0
    snapshots_blocked: int = 0
    bad_subjects: int = 0  # names no agent may publish under (not forwarded)

    def as_dict(self) -> dict[str, int]:
        """Every counter by name."""
        return dict(self.__dict__)


@dataclass
class _Late:
    """A message waiting for ``left`` more batches of its pod to pass it."""

    left: int
    subject: str
    data: bytes
    headers: dict[str, str] | None


@dataclass
class _PodDice:
    rng: random.Random
    late: list[_Late] = field(default_factory=list)


class _Collector(Collector):
    def __init__(self, hop: KVChaos) -> None:
        self.hop = hop

    def collect(self) -> Iterator[Metric]:
        st = self.hop.stats

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield counter("infermesh_chaos_batches_received", "KV batches received from agents",
                      st.received)
        yield counter("infermesh_chaos_batches_forwarded",
                      "KV batch messages sent on (duplicate copies included)", st.forwarded)
        faults = CounterMetricFamily("infermesh_chaos_faults",
                                     "KV batches hit by a fault, per fault (drop, duplicate, "
                                     "reorder)", labels=["fault"])
        faults.add_metric(["drop"], st.dropped)
        faults.add_metric(["duplicate"], st.duplicated)
        faults.add_metric(["reorder"], st.reordered)
        yield faults
        yield counter("infermesh_chaos_released",
                      "Held-back messages sent by a flush (faults off, on request, at shutdown)",
                      st.released)
        yield counter("infermesh_chaos_heartbeats_forwarded", "Heartbeats forwarded",
                      st.heartbeats)
        snaps = CounterMetricFamily("infermesh_chaos_snapshot_requests",
                                    "Snapshot requests, per outcome (forwarded, blocked)",
                                    labels=["outcome"])
        snaps.add_metric(["forwarded"], st.snapshots_forwarded)
        snaps.add_metric(["blocked"], st.snapshots_blocked)
        yield snaps
        yield counter("infermesh_chaos_bad_subjects",
                      "Messages not forwarded: their pool or pod is not a valid name",
                      st.bad_subjects)
        yield GaugeMetricFamily("infermesh_chaos_held", "Messages held back right now",
                                value=self.hop.held())


class KVChaos:
    """The hop. ``await start()``, then ``await stop()``."""

    def __init__(self, cfg: ChaosConfig, nc: Client | None = None) -> None:
        self.cfg = cfg
        self.src = Subjects(cfg.from_prefix)
        self.dst = Subjects(cfg.to_prefix)
        self.control_subject = cfg.control_subject or f"{cfg.to_prefix}.chaos.control"
        self.drop, self.duplicate, self.reorder = cfg.drop, cfg.duplicate, cfg.reorder
        self.block_snapshots = cfg.block_snapshots
        self.stats = ChaosStats()
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))
        self._pods: dict[str, _PodDice] = {}
        self._nc = nc
        self._own_nc = nc is None
        self._subs: list[Any] = []
        self._service: BusService | None = None
        self._ops: OpsServer | None = None
        self.http_port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, subscribe both ways, and serve the control subject and /metrics."""
        if self._nc is None:
            self._nc = await connect(self.cfg.nats_url, "chaos", security=self.cfg.bus_security())
        nc = self._nc
        routes = [(f"{self.src.prefix}.kv.*.*", self._on_kv),
                  (self.src.pod_state_all, self._on_pod),
                  (self.dst.kv_snapshot_all, self._on_snapshot)]
        self._subs = [
            await nc.subscribe(subject, cb=cb, pending_msgs_limit=_PENDING_MSGS,
                               pending_bytes_limit=_PENDING_BYTES)
            for subject, cb in routes
        ]
        svc = BusService(nc, "infermesh-chaos", description="fault-injecting KV hop",
                         registry=self.registry)
        svc.endpoint("control", self.control_subject, ChaosControl, self._on_control)
        await svc.start()
        self._service = svc
        await settle(nc)
        if self.cfg.http_port >= 0:
            self._ops = OpsServer([self.registry, BUS_REGISTRY], self._health)
            self.http_port = await self._ops.start(self.cfg.http_host, self.cfg.http_port)
        log.info("chaos_started", source=self.src.prefix, target=self.dst.prefix,
                 control=self.control_subject, http_port=self.http_port, **self._settings())

    async def stop(self) -> None:
        """Release what is held back, then stop."""
        await release(subs=self._subs)
        self._subs = []
        with contextlib.suppress(Exception):
            await self.flush()
        await release(service=self._service, ops=self._ops,
                      nc=self._nc if self._own_nc else None)
        self._service, self._ops = None, None
        log.info("chaos_stopped", **self.stats.as_dict())

    def _health(self) -> tuple[bool, dict[str, Any]]:
        ok = self._nc is not None and self._nc.is_connected
        return ok, {**self._settings(), "held": self.held(), **self.stats.as_dict()}

    def _settings(self) -> dict[str, Any]:
        return {"drop": self.drop, "duplicate": self.duplicate, "reorder": self.reorder,
                "block_snapshots": self.block_snapshots}

    def held(self) -> int:
        """Messages held back right now."""
        return sum(len(d.late) for d in self._pods.values())

    # ------------------------------------------------------------------ KV batches

    def _dice(self, pod: str) -> _PodDice:
        d = self._pods.get(pod)
        if d is None:
            d = self._pods[pod] = _PodDice(random.Random(f"{self.cfg.seed}/{pod}"))
        return d

    def route(self, pod: str, subject: str, data: bytes,
              headers: dict[str, str] | None) -> list[tuple[str, bytes, dict[str, str] | None]]:
        """Roll the dice for one batch; return the messages to send now, in order.

        No I/O here, so the fault logic can be tested on its own.
        """
        st = self.stats
        st.received += 1
        d = self._dice(pod)
        # Those held back earlier see one more batch pass (this one, whatever happens to it).
        due: list[_Late] = []
        for late in d.late:
            late.left -= 1
            if late.left <= 0:
                due.append(late)
        if due:
            d.late = [x for x in d.late if x.left > 0]
        out: list[tuple[str, bytes, dict[str, str] | None]] = []
        roll = d.rng.random()
        if roll < self.drop:
            st.dropped += 1
        elif roll < self.drop + self.reorder:
            st.reordered += 1
            d.late.append(_Late(self.cfg.reorder_depth, subject, data, headers))
        else:
            out.append((subject, data, headers))
            if roll < self.drop + self.reorder + self.duplicate:
                st.duplicated += 1
                after = d.rng.randint(0, self.cfg.duplicate_delay)
                if after == 0:
                    out.append((subject, data, headers))
                else:
                    d.late.append(_Late(after, subject, data, headers))
        out.extend((x.subject, x.data, x.headers) for x in due)
        st.forwarded += len(out)
        return out

    async def _on_kv(self, msg: Msg) -> None:
        where = self.src.parse_kv(msg.subject)
        if where is None:
            return  # not <prefix>.kv.<pool>.<pod> (the subscription only delivers those)
        pool, pod = where
        assert self._nc is not None
        try:
            target = self.dst.kv(pool, pod)
        except ValueError:
            self._bad(msg.subject)  # not a name any agent may publish under
            return
        for subject, data, headers in self.route(pod, target, msg.data, msg.headers):
            await self._nc.publish(subject, data, headers=headers)

    async def flush(self) -> int:
        """Send every held-back message now (per pod, in the order they were held)."""
        assert self._nc is not None
        n = 0
        for d in self._pods.values():
            late, d.late = d.late, []
            for x in late:
                await self._nc.publish(x.subject, x.data, headers=x.headers)
                n += 1
        self.stats.released += n
        self.stats.forwarded += n
        if n:
            log.info("chaos_flushed", messages=n)
        return n

    def _bad(self, subject: str) -> None:
        self.stats.bad_subjects += 1
        log.debug("bad_subject", subject=subject[:200])

    # ------------------------------------------------------------------ heartbeats, snapshots

    async def _on_pod(self, msg: Msg) -> None:
        where = self.src.parse_pod_state(msg.subject)
        if where is None:
            return
        assert self._nc is not None
        try:
            target = self.dst.pod_state(*where)
        except ValueError:
            self._bad(msg.subject)
            return
        self.stats.heartbeats += 1
        await self._nc.publish(target, msg.data, headers=msg.headers)

    async def _on_snapshot(self, msg: Msg) -> None:
        pod = msg.subject.rsplit(".", 1)[-1]
        assert self._nc is not None
        if self.block_snapshots:
            self.stats.snapshots_blocked += 1
            if msg.reply:
                await self._nc.publish(msg.reply, b"", headers=_ERROR_HEADERS)
            return
        try:
            target = self.src.kv_snapshot(pod)
        except ValueError:
            self._bad(msg.subject)
            return
        self.stats.snapshots_forwarded += 1
        # The reply subject stays the requester's: the agent's parts go straight back to it.
        await self._nc.publish(target, msg.data, reply=msg.reply, headers=msg.headers)

    # ------------------------------------------------------------------ control

    async def _on_control(self, req: ChaosControl) -> ChaosStatus:
        drop = self.drop if req.drop is None else req.drop
        duplicate = self.duplicate if req.duplicate is None else req.duplicate
        reorder = self.reorder if req.reorder is None else req.reorder
        try:
            _check_odds(drop, duplicate, reorder)
        except ValueError as e:
            raise reply_error(400, str(e)) from None
        self.drop, self.duplicate, self.reorder = drop, duplicate, reorder
        if req.block_snapshots is not None:
            self.block_snapshots = req.block_snapshots
        if req.flush or not (drop or duplicate or reorder):
            await self.flush()
        log.info("chaos_control", **self._settings())
        return ChaosStatus(held=self.held(), counts=self.stats.as_dict(), **self._settings())


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The hop's command line."""
    p = parser or argparse.ArgumentParser(prog="infermesh chaos")
    p.description = ("Run a fault-injecting hop between agents (--from-prefix) and the bus "
                     "(--to-prefix): drops, duplicates and reorders KV event batches.")
    p.add_argument("--config", help="YAML file with any of the options below")
    add_arguments(p, ChaosConfig)
    return p


async def run(cfg: ChaosConfig) -> None:
    """Run until SIGINT/SIGTERM."""
    hop = KVChaos(cfg)
    await run_until_stopped(hop.start, hop.stop)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    cfg = load_config(ChaosConfig, args, env_prefix="INFERMESH_CHAOS", file=args.config)
    configure_logging("chaos")
    asyncio.run(run(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
