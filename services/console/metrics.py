"""The console's Prometheus metrics: what it read from the bus, and whom it serves."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ConsoleMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.messages = Counter(
            "infermesh_console_bus_messages", "Bus messages read, by kind and outcome (bad: not "
            "a valid message, counted and dropped)", ["kind", "outcome"], registry=r)
        self.clients = Gauge("infermesh_console_clients",
                             "Browsers following /console/events now", registry=r)
        self.updates = Counter("infermesh_console_updates",
                               "Snapshots pushed to browsers (one per browser each)", registry=r)
        self.skipped = Counter(
            "infermesh_console_updates_skipped", "Snapshots a slow browser never got (a newer "
            "one replaced it before it read it)", registry=r)
        self.refused = Counter("infermesh_console_refused",
                               "Requests refused, by status", ["status"], registry=r)
        self.pods = Gauge("infermesh_console_pods", "Pods the console shows", registry=r)
