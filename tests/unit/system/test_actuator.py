"""The local actuator's convergence (services/system/actuator.py) on a real plan's slots, with a
supervisor that records instead of starting processes and a tiny HTTP server as the agents'
/drain and /undrain: starts the lowest parked slots, drains the highest, takes draining slots
back before starting cold ones when the target rises again, stops a drained slot once idle."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from infermesh.proto.messages import PodState
from infermesh.services.system import actuator as act
from infermesh.services.system.plan import plan
from infermesh.services.system.spec import SystemSpec


class _Supervisor:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def start(self, name: str) -> None:
        self.calls.append(("start", name))

    def stop(self, name: str) -> None:
        self.calls.append(("stop", name))


class _System:
    def __init__(self, tmp: Path) -> None:
        self.plan = plan(SystemSpec(engines=1, autoscale=True, state_dir=str(tmp),
                                    settings={"autoscaler": {"max_replicas": 3}}))
        self.supervisor = _Supervisor()


@pytest.fixture
def agents() -> Any:
    """POST /<pod>/drain and /<pod>/undrain, recorded."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            seen.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, seen
    srv.shutdown()


def _idle(pod: str, draining: bool = True) -> PodState:
    return PodState(pod=pod, pool="default", model="m", url="", ts=1.0, epoch="e", kv_seq=0,
                    ready=not draining, labels={"draining": "true"} if draining else {})


def test_converges_and_takes_draining_slots_back_first(tmp_path: Path, agents: Any) -> None:
    srv, seen = agents
    system = _System(tmp_path)
    a = act.LocalActuator(system)  # type: ignore[arg-type]
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    for slot in a.slots:
        slot.drain_url = f"{base}/{slot.pod}/drain"
    pods = [s.pod for s in a.slots]
    assert [s.running for s in a.slots] == [True, False, False]
    calls = system.supervisor.calls
    a.target = 3
    a.step()
    started = [n for what, n in calls if what == "start"]
    assert started == a.slots[1].procs + a.slots[2].procs  # engine, then agent, per slot
    a.target = 1
    a.step()  # the two highest drain
    assert seen == [f"/{pods[2]}/drain", f"/{pods[1]}/drain"]
    assert a.slots[1].draining_since is not None and a.slots[2].draining_since is not None
    # The target rises again before they stopped: one is taken back, nothing cold starts.
    a.target = 2
    n_calls = len(calls)
    a.step()
    assert seen[-1].endswith("/undrain") and len(calls) == n_calls
    back = next(s for s in a.slots if seen[-1] == f"/{s.pod}/undrain")
    assert back.draining_since is None and back.history[-1][1] == "undrained"
    assert len(a.running) == 2
    # The other one drains on; idle heartbeats for DRAIN_IDLE_S stop it.
    other = next(s for s in a.slots[1:] if s is not back)
    a.states[other.pod] = _idle(other.pod)
    a.step()
    assert other.idle_since is not None and other.running
    other.idle_since -= act.DRAIN_IDLE_S  # as if it had been idle that long
    a.step()
    assert [n for what, n in calls[n_calls:] if what == "stop"] == list(reversed(other.procs))
    assert not other.running and other.history[-1][1] == "stopped"
    # An agent that does not answer /undrain: its slot drains on and a parked one starts.
    a.target = 1
    a.step()
    assert back.draining_since is not None
    back.drain_url = "http://127.0.0.1:9/x/drain"  # nothing listens there
    a.target = 2
    before = len(calls)
    a.step()
    assert back.draining_since is not None
    assert [n for what, n in calls[before:] if what == "start"] == other.procs
