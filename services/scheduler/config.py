"""Configuration of the scheduler service (CLI, env ``INFERMESH_SCHEDULER_*``, ``--config`` file):
the scheduling knobs of :mod:`infermesh.libs.scheduling.config`, with the service's own."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from infermesh.libs.bus import BusKnobs
from infermesh.libs.config import knob
from infermesh.libs.scheduling.config import SchedulingKnobs


@dataclass
class SchedulerConfig(BusKnobs, SchedulingKnobs):
    """Every knob of `infermesh scheduler`."""

    replica: str = knob("", "Name of this replica in logs and health (empty: host-pid)")
    http_host: str = knob("127.0.0.1", "Address of the /health and /metrics server")
    http_port: int = knob(0, "Port of the /health and /metrics server (0: a free port, -1: none)")

    def __post_init__(self) -> None:
        self.check_scheduling()

    def replica_name(self) -> str:
        """The configured replica name, or ``<host>-<pid>``."""
        return self.replica or f"{socket.gethostname()}-{os.getpid()}"
