"""Session affinity: a conversation's turns go to the engine of its last turn, on every
scheduler replica, learnt from the routed events that carry the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from infermesh.libs.config import ConfigError
from infermesh.libs.scheduling.framework import CycleState, Handle, Parameters
from infermesh.libs.scheduling.plugins import SessionAffinityScorer
from infermesh.proto.messages import RequestEvent
from infermesh.services.scheduler.config import SchedulerConfig
from infermesh.services.scheduler.service import SchedulerService

from .conftest import pod, pod_state, req


def routed(rid: str, pod_name: str, session: str = "", **kw: object) -> RequestEvent:
    return RequestEvent(kind="routed", request_id=rid, pod=pod_name, pool="default", model="m",
                        ts=0.0, session=session, **kw)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def test_the_sessions_pod_scores_1_the_others_0_and_no_session_is_neutral() -> None:
    s = SessionAffinityScorer("session")
    pods = [pod("a"), pod("b"), pod("c")]
    s.on_request_event(routed("r1", "b", "conv-1"))
    s.on_request_event(routed("r2", "c", ""))  # no session: nothing learnt
    s.on_request_event(routed("r3", "a", "conv-2", leg="prefill"))  # a prefill leg is not it
    cycle = CycleState()
    assert await s.score(req(session_id="conv-1"), cycle, pods) == {"a": 0.0, "b": 1.0, "c": 0.0}
    for other in (req(), req(session_id="conv-2"), req(session_id="never-seen")):
        assert await s.score(other, cycle, pods) == {"a": 1.0, "b": 1.0, "c": 1.0}
    # Its pod is not a candidate (gone, excluded): no preference among the others.
    assert await s.score(req(session_id="conv-1"), cycle, [pod("a"), pod("c")]) == \
        {"a": 1.0, "c": 1.0}
    # The next turn went elsewhere (another replica's decision, a retry): follow it.
    s.on_request_event(routed("r4", "c", "conv-1"))
    assert (await s.score(req(session_id="conv-1"), cycle, pods))["c"] == 1.0


def test_sessions_are_forgotten_after_ttl_and_past_the_bound() -> None:
    clock = Clock()
    s = SessionAffinityScorer("session", ttl_s=10.0, max_sessions=3, clock=clock)
    for i in range(3):
        s.on_request_event(routed(f"r{i}", "a", f"s{i}"))
    s.on_request_event(routed("r0b", "b", "s0"))  # s0 routed again: now the most recent
    s.on_request_event(routed("r3", "a", "s3"))  # over the bound: the least recent (s1) goes
    assert s.pod_of("s1") is None and s.pod_of("s0") == "b" and len(s) == 3
    clock.t = 9.9
    assert s.pod_of("s3") == "a"
    clock.t = 10.0
    assert s.pod_of("s3") is None
    s.on_request_event(routed("r9", "c", "s9"))  # expired entries are dropped as it goes
    assert len(s) == 1


def test_parameters(handle: Handle) -> None:
    s = SessionAffinityScorer.create("s", Parameters({"ttl_s": 5, "max_sessions": 7}, "s"),
                                     handle)
    assert s.ttl_s == 5 and s.max_sessions == 7
    for bad in ({"ttl_s": 0}, {"max_sessions": 0}, {"sticky": True}):
        with pytest.raises(ConfigError):
            SessionAffinityScorer.create("s", Parameters(bad, "s"), handle)


PROFILES = """
plugins:
  - {name: roles, type: role-filter}
  - {name: session, type: session-affinity-scorer}
  - {name: load, type: load-aware-scorer}
  - {name: pick, type: max-score-picker}
default_profile: chat
profiles:
  - name: chat
    plugins:
      - ref: roles
      - {ref: session, weight: 2}
      - {ref: load, weight: 1}
      - ref: pick
"""


async def test_a_conversation_stays_on_its_engine_on_every_replica(tmp_path: Path) -> None:
    """Replica A routes turn 1; replica B, fed the same events, routes turn 2 to the same
    engine though another is idler; a request without a session goes by load."""
    f = tmp_path / "profiles.yaml"
    f.write_text(PROFILES)
    a = SchedulerService(SchedulerConfig(profiles_file=str(f), seed=1))
    b = SchedulerService(SchedulerConfig(profiles_file=str(f), seed=2))
    for svc in (a, b):
        for name in ("e1", "e2", "e3"):
            svc.pods.update(pod_state(name))
    published: list[RequestEvent] = []
    d1 = await a._on_schedule(req("t1", session_id="conv"))
    published.append(routed("t1", d1.pod, "conv", replica="a"))
    busy = [routed(f"x{i}", d1.pod) for i in range(3)]  # the conversation's engine gets busy
    for ev in [*published, *busy]:
        b.apply_event(ev)
        a.apply_event(ev)
    d2 = await b._on_schedule(req("t2", session_id="conv"))
    assert d2.pod == d1.pod
    d3 = await a._on_schedule(req("t3", session_id="conv"))
    assert d3.pod == d1.pod
    loose = await b._on_schedule(req("other"))
    assert loose.pod != d1.pod  # no session: the idler engines
