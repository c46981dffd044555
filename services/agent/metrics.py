"""The agent's own Prometheus metrics (served on its /metrics, next to the bus client's)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class AgentMetrics:
    """The agent's own counters (served on its /metrics)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.engine_batches = Counter(
            "infermesh_agent_engine_batches", "Engine batches applied", registry=r
        )
        self.engine_events = Counter(
            "infermesh_agent_engine_events", "Engine events applied", registry=r
        )
        self.bad_frames = Counter(
            "infermesh_agent_bad_frames", "ZMQ messages with bad framing", registry=r
        )
        self.bad_payloads = Counter(
            "infermesh_agent_bad_payloads", "Engine payloads that did not decode", registry=r
        )
        self.gaps = Counter("infermesh_agent_seq_gaps", "Engine seq gaps seen", registry=r)
        self.lost_batches = Counter(
            "infermesh_agent_lost_batches",
            "Engine batches neither received nor replayed",
            registry=r,
        )
        self.replays = Counter(
            "infermesh_agent_replays", "Replay requests made", ["outcome"], registry=r
        )
        self.engine_restarts = Counter(
            "infermesh_agent_engine_restarts", "Engine restarts detected", registry=r
        )
        self.rebuilds = Counter(
            "infermesh_agent_rebuilds", "Full rebuilds of the block set", registry=r
        )
        self.bus_batches = Counter(
            "infermesh_agent_bus_batches", "KVEventBatch messages published", registry=r
        )
        self.bus_events = Counter(
            "infermesh_agent_bus_events", "Events published on the bus", registry=r
        )
        self.snapshots = Counter(
            "infermesh_agent_snapshots", "Snapshot requests answered", ["outcome"], registry=r
        )
        self.scrape_errors = Counter(
            "infermesh_agent_scrape_errors", "Failed /metrics scrapes", registry=r
        )
        self.engine_lost = Counter(
            "infermesh_agent_engine_lost",
            "Times the engine's port refused connections for engine_lost_s (cache dropped)",
            registry=r,
        )
        self.blocks = Gauge(
            "infermesh_agent_blocks", "Blocks the engine holds (any tier)", registry=r
        )
