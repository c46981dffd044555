"""Configuration of the fleet console (CLI, env ``INFERMESH_CONSOLE_*``, file)."""

from __future__ import annotations

from dataclasses import dataclass

from infermesh.libs import liveness
from infermesh.libs.bus import BusKnobs
from infermesh.libs.config import knob


@dataclass
class ConsoleConfig(BusKnobs):
    """Every knob of `infermesh console`."""

    http_host: str = knob("127.0.0.1", "Address of the console page, its API, /health and "
                          "/metrics")
    http_port: int = knob(8090, "Port of the console (0: a free port)")
    decisions: int = knob(50, "Routing decisions kept (the latest ones; the page shows them)")
    history_s: int = knob(120, "Seconds of hit-rate and request-rate history kept (one point "
                          "per second)")
    updates_per_s: float = knob(
        4.0, "Most updates per second pushed to each browser (changes in between are merged)")
    max_clients: int = knob(32, "Most browsers following /console/events at once (more: 503)")
    keepalive_s: float = knob(15.0, "A comment on an idle event stream this often, so proxies "
                              "keep it open")
    pod_timeout_s: float = knob(
        10.0, "A pod silent this long (while others of its pool speak), or silent this long "
        "after saying it is not ready, leaves the page")
    pod_late_s: float = knob(1.0, "A pod silent this long is shown late")
    demand_timeout_s: float = knob(
        5.0, "An ingress's demand (requests held for a pool) is shown for this long")

    def __post_init__(self) -> None:
        if not 1 <= self.decisions <= 10_000:
            raise ValueError("decisions must be within 1..10000")
        if not 10 <= self.history_s <= 3600:
            raise ValueError("history_s must be within 10..3600")
        if not 0 < self.updates_per_s <= 50:
            raise ValueError("updates_per_s must be > 0 and at most 50")
        if self.max_clients < 1 or self.keepalive_s <= 0 or self.demand_timeout_s <= 0:
            raise ValueError("max_clients, keepalive_s and demand_timeout_s must be positive")
        if not 0 <= self.http_port <= 65535:
            raise ValueError("http_port must be within 0..65535 (the console is its HTTP "
                             "server)")
        liveness.check_times(self.pod_late_s, self.pod_timeout_s)
