"""Pods from heartbeats and in-flight counting: optimistic, deduplicated, expiring."""

from __future__ import annotations

from infermesh.libs.scheduling.state import InFlight, PodTable

from .conftest import pod_state


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_late_pods_stay_candidates_and_only_long_silence_beside_live_pods_drops():
    clock = Clock()
    table = PodTable(10.0, clock, late_s=1.0)
    table.update(pod_state("a"))
    table.update(pod_state("b"))
    clock.now += 0.6
    table.update(pod_state("a"))
    clock.now += 0.6
    # b's heartbeat is 1.2 s old: late, still a candidate on its last known state.
    assert [p.name for p in table.candidates("default", "m")[0]] == ["a", "b"]
    assert table.late() == 1 and table.prune() == [] and len(table) == 2
    # Silent for 10 s while a speaks steadily: dropped.
    for _ in range(24):
        clock.now += 0.5
        table.update(pod_state("a"))
    assert table.prune() == ["b"] and len(table) == 1 and table.late() == 0
    # Evidence from the agent drops at once.
    assert table.update(pod_state("a", ready=False)) is True
    assert len(table) == 0 and table.update(pod_state("a", ready=False)) is False


def test_a_silent_pool_is_never_emptied_by_silence_alone():
    clock = Clock()
    table = PodTable(10.0, clock, late_s=1.0)
    table.update(pod_state("a"))
    table.update(pod_state("b"))
    table.update(pod_state("c", pool="p2"))
    clock.now += 60.0  # this replica (or the bus) was cut off a minute: everyone is silent
    assert table.prune() == [] and table.late() == 3
    assert [p.name for p in table.candidates("default", "m")[0]] == ["a", "b"]
    # The first pod to speak again proves nothing at once: b was silent with everyone.
    table.update(pod_state("a"))
    assert table.prune() == [] and len(table) == 3
    # a speaks steadily for 10 s, b does not: b is dead. p2's silent pod stays (its pool has
    # nobody speaking).
    for _ in range(20):
        clock.now += 0.5
        table.update(pod_state("a"))
    assert table.prune() == ["b"]
    assert [p.name for p in table.candidates("p2", "m")[0]] == ["c"]


def test_candidates_match_pool_model_exclude_and_labels():
    table = PodTable(1.0, Clock())
    table.update(pod_state("a", labels={"zone": "x"}))
    table.update(pod_state("b", labels={"zone": "y"}))
    table.update(pod_state("c", model="other"))
    table.update(pod_state("d", pool="p2"))
    table.update(pod_state("e", labels={"zone": "x"}))
    names = lambda r: sorted(p.name for p in r[0])  # noqa: E731
    assert names(table.candidates("default", "m")) == ["a", "b", "e"]
    assert names(table.candidates("default", "")) == ["a", "b", "c", "e"]
    assert names(table.candidates("p2", "m")) == ["d"]
    pods, serving = table.candidates("default", "m", exclude=["a"], labels={"zone": "x"},
                                     inflight={"e": 3}.get)  # type: ignore[arg-type]
    assert [(p.name, p.inflight) for p in pods] == [("e", 3)] and serving == 3


def test_inflight_counts_once_per_request_and_moves_on_retry():
    fl = InFlight(10.0, Clock())
    assert fl.routed("r1", "a") is True  # this replica's decision
    assert fl.routed("r1", "a") is False  # the ingress's routed event: no double count
    assert fl.count("a") == 1
    fl.routed("r2", "a")
    fl.routed("r2", "b")  # the ingress retried r2 on b
    assert fl.counts() == {"a": 1, "b": 1} and fl.pod_of("r2") == "b"
    assert fl.finished("r1") is True and fl.finished("r1") is False
    assert fl.finished("unknown") is False
    assert fl.counts() == {"b": 1} and len(fl) == 1


def test_inflight_expires_requests_that_never_finish():
    clock = Clock()
    fl = InFlight(10.0, clock)
    fl.routed("old", "a")
    clock.now += 6
    fl.routed("young", "a")
    fl.routed("touched", "b")
    clock.now += 3
    fl.touch("old")  # a first token pushes the deadline back
    clock.now += 2
    assert fl.expire() == 0
    clock.now += 6  # 17 s after "old" was routed, 8 after it was touched
    assert fl.expire() == 2  # young and touched
    assert fl.counts() == {"a": 1} and fl.pod_of("old") == "a"
    clock.now += 10
    assert fl.expire() == 1 and fl.counts() == {} and len(fl) == 0
