"""A scheduling cycle and the service's handler, without a bus: profile selection, errors,
scores in the decision, and optimistic in-flight counting across a burst."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from nats.micro.request import ServiceError
from prometheus_client import generate_latest

from infermesh.libs.scheduling.config import load_pipeline
from infermesh.libs.scheduling.framework import CycleState, Handle, NoCandidates
from infermesh.libs.scheduling.metrics import SchedulerMetrics
from infermesh.libs.scheduling.scheduler import Scheduler, UnknownProfile, total_scores
from infermesh.libs.scheduling.state import InFlight
from infermesh.proto import codec
from infermesh.proto.messages import (
    ROUTED_SCORES_MAX,
    LookupReply,
    LookupRequest,
    PodMatch,
    RequestEvent,
)
from infermesh.services.scheduler.config import SchedulerConfig
from infermesh.services.scheduler.service import SchedulerService

from .conftest import pod, pod_state, req


async def fake_index(msg: LookupRequest, timeout: float) -> LookupReply:
    # pod "b" holds the first 3 blocks of every prompt.
    return LookupReply(matches=[PodMatch(pod="b", blocks=min(3, len(msg.block_keys)))])


def make_scheduler() -> Scheduler:
    metrics = SchedulerMetrics()
    handle = Handle(metrics, fake_index, random.Random(2))
    return Scheduler(load_pipeline(None, handle), metrics)


async def test_profile_selection_by_name_default_and_unknown():
    s = make_scheduler()
    pods = [pod("a", block_size=16), pod("b", block_size=16), pod("c", block_size=16)]
    d = await s.schedule(req(keys=[1, 2, 3, 4]), pods)
    assert d.profile == "default" and d.pod == "b" and d.url == "http://b:8000"
    assert d.cached_blocks == 3
    assert set(d.scores) == {"precise-prefix", "token-load", "lora-affinity", "session", "total"}
    # No adapter, no session: those two score every pod alike.
    assert d.scores["lora-affinity"] == d.scores["session"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert d.scores["precise-prefix"] == {"a": 0.0, "b": 0.75, "c": 0.0}
    # Nothing in flight: b, holding 3 of the 4 blocks, has the least of this prompt to compute.
    assert d.scores["token-load"] == {"a": 0.0, "b": 1.0, "c": 0.0}
    assert d.scores["total"]["b"] == pytest.approx(0.75 + 1 + 1 + 1)
    old = await s.schedule(req(keys=[1, 2, 3, 4], profile="precise-prefix"), pods)
    assert set(old.scores) == {"precise-prefix", "load", "total"} and old.pod == "b"
    assert old.scores["total"]["b"] == pytest.approx(3 * 0.75 + 1)
    m = await s.schedule(req(keys=[1, 2, 3, 4], profile="llm-d"), pods)
    assert set(m.scores) == {"precise-prefix", "queue", "kv-utilization", "total"}
    assert m.scores["total"]["b"] == pytest.approx(3 * 0.75 + 2 + 2)
    rr = await s.schedule(req(keys=[1, 2, 3, 4], profile="round-robin"), pods)
    assert rr.profile == "round-robin" and rr.scores == {} and rr.cached_blocks == 0
    with pytest.raises(UnknownProfile):
        await s.schedule(req(profile="fastest"), pods)


async def test_filters_that_leave_nobody_raise_no_candidates():
    s = make_scheduler()
    with pytest.raises(NoCandidates, match="serving-roles"):
        await s.schedule(req(), [pod("p", role="prefill")])


async def test_plugin_timings_are_recorded_per_plugin():
    s = make_scheduler()
    await s.schedule(req(keys=[1]), [pod("a"), pod("b")])
    text = generate_latest(s.metrics.registry).decode()
    for plugin in ("precise-prefix", "token-load", "serving-roles", "max-score"):
        assert f'infermesh_scheduler_plugin_seconds_count{{plugin="{plugin}"' in text
    assert 'infermesh_scheduler_decision_seconds_count{profile="default"} 1.0' in text


def service(**kw: object) -> SchedulerService:
    svc = SchedulerService(SchedulerConfig(seed=7, **kw))  # type: ignore[arg-type]
    svc.handle.index_lookup = fake_index
    return svc


async def test_handler_errors_unknown_profile_no_engine_and_bad_fields():
    svc = service()
    with pytest.raises(ServiceError) as e:
        await svc._on_schedule(req())
    assert e.value.code == "503" and "no engine serves model 'm' in pool 'default'" in \
        e.value.description
    svc.pods.update(pod_state("a"))
    with pytest.raises(ServiceError) as e:
        await svc._on_schedule(req(profile="nope"))
    assert e.value.code == "400" and "unknown profile 'nope'" in e.value.description
    with pytest.raises(ServiceError) as e:
        await svc._on_schedule(req(exclude=["a"]))
    assert e.value.code == "503" and "1 serve it" in e.value.description
    with pytest.raises(ServiceError) as e:
        await svc._on_schedule(req(request_id=""))
    assert e.value.code == "400"
    d = await svc._on_schedule(req())
    assert d.pod == "a" and d.profile == "default"


async def test_a_burst_is_spread_before_any_routed_event_comes_back():
    svc = service()
    for name in "abcd":
        svc.pods.update(pod_state(name))
    decisions = [await svc._on_schedule(req(f"r{i}", profile="load")) for i in range(8)]
    assert Counter(d.pod for d in decisions) == {p: 2 for p in "abcd"}
    assert svc.inflight.counts() == {p: 2 for p in "abcd"}
    # The ingress's routed events for the same requests do not count them again.
    for d in decisions:
        svc.apply_event(RequestEvent(kind="routed", request_id=d.request_id, pod=d.pod,
                                     pool="default", model="m", ts=0.0))
    assert svc.inflight.counts() == {p: 2 for p in "abcd"}
    # Another replica's requests (seen only as events) count too.
    for i in range(4):
        svc.apply_event(RequestEvent(kind="routed", request_id=f"x{i}", pod="a",
                                     pool="default", model="m", ts=0.0))
    d = await svc._on_schedule(req("r9", profile="load"))
    assert d.pod != "a" and d.scores["load"]["a"] < d.scores["load"][d.pod]
    for rid in [*(d.request_id for d in decisions), "r9", "x0", "x1", "x2", "x3"]:
        svc.apply_event(RequestEvent(kind="finished", request_id=rid, pod="", pool="default",
                                     model="m", ts=0.0))
    assert svc.inflight.counts() == {} and len(svc.inflight) == 0


async def test_inflight_entries_expire_and_pods_drop_out():
    svc = service(inflight_timeout_s=5.0, pod_timeout_s=1.0)
    now = [0.0]
    svc.core.inflight = InFlight(5.0, lambda: now[0])
    svc.pods.clock = lambda: now[0]
    svc.pods.update(pod_state("a"))
    await svc._on_schedule(req("r1", keys=[1, 2], profile="approx-prefix"))
    approx = svc.pipeline.plugins["approx-prefix"]
    assert svc.inflight.counts() == {"a": 1} and approx.blocks_of("a") == 2  # type: ignore
    now[0] = 5.0
    svc.pods.update(pod_state("b"))
    now[0] = 6.0
    svc.pods.update(pod_state("b"))  # b speaks steadily, a has been silent for 6 s: a is dead
    svc.prune()
    assert svc.inflight.counts() == {} and len(svc.pods) == 1
    assert approx.blocks_of("a") == 0  # type: ignore[attr-defined]
    assert svc.metrics.inflight_expired._value.get() == 1


async def test_profile_clamps_scores_and_weights_the_sum():
    from infermesh.libs.scheduling.framework import Profile, Scorer
    from infermesh.libs.scheduling.plugins import MaxScorePicker

    class Wild(Scorer):
        type_name = "wild"

        async def score(self, request, cycle, pods):  # type: ignore[no-untyped-def]
            return {"a": 1.5, "b": float("nan"), "c": -2.0, "ghost": 1.0}

    class Half(Scorer):
        type_name = "half"

        async def score(self, request, cycle, pods):  # type: ignore[no-untyped-def]
            return {"c": 0.5}

    timed: list[str] = []
    prof = Profile("p", [], [(Wild("wild"), 1.0), (Half("half"), 4.0)],
                   MaxScorePicker("max", random.Random(0)))
    result = await prof.run(req(), CycleState(), [pod("a"), pod("b"), pod("c")],
                            lambda plugin, s: timed.append(plugin.name))
    assert result.scores["wild"] == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert result.scores["half"] == {"a": 0.0, "b": 0.0, "c": 0.5}
    assert result.totals == {"a": 1.0, "b": 0.0, "c": 2.0} and result.pod.name == "c"
    assert timed == ["wild", "half", "max"]


async def test_the_announced_routed_event_carries_profile_scores_and_cached_blocks():
    """What the fleet console shows of a decision: its profile, the best candidates' totals
    (at most ROUTED_SCORES_MAX) and the blocks the chosen pod held."""
    svc = service()
    for name in ("a", "b", *(f"x{i}" for i in range(10))):
        svc.pods.update(pod_state(name))
    sent: list[tuple[str, bytes]] = []

    class _Bus:
        async def publish(self, subject: str, data: bytes) -> None:
            sent.append((subject, data))

    svc.core._nc = _Bus()  # type: ignore[assignment]
    d = await svc.core.decide(req("r1", keys=[1, 2, 3, 4], announce=True))
    ((subject, data),) = sent
    ev = codec.decode(data, RequestEvent)
    assert subject == "im.req.default" and ev.kind == "routed" and ev.pod == d.pod == "b"
    assert ev.profile == "default" and ev.cached_blocks == 3
    assert len(ev.scores) == ROUTED_SCORES_MAX and "b" in ev.scores
    assert ev.scores == total_scores(d)
    assert max(ev.scores.values()) == ev.scores["b"] == d.scores["total"]["b"]
    # Without scores (a picker alone), none are listed.
    assert total_scores(await svc.core.decide(req("r2", profile="round-robin"))) == {}
