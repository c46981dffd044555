"""Filters, pickers and the profile handler."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from infermesh.libs.config import ConfigError
from infermesh.libs.scheduling.framework import CycleState, Parameters, ScoredPod
from infermesh.libs.scheduling.plugins import (
    LabelFilter,
    MaxScorePicker,
    RandomPicker,
    RoleFilter,
    RoundRobinPicker,
)

from .conftest import pod, req


def names(pods) -> list[str]:
    return [p.name for p in pods]


def test_label_filter_keeps_pods_with_every_label(handle):
    f = LabelFilter.create("f", Parameters({"match_labels": {"gpu": "h100", "zone": "a"}}, "f"),
                           handle)
    pods = [pod("a", labels={"gpu": "h100", "zone": "a", "x": "y"}),
            pod("b", labels={"gpu": "h100"}), pod("c")]
    assert names(f.filter(req(), CycleState(), pods)) == ["a"]
    with pytest.raises(ConfigError, match="match_labels"):
        LabelFilter.create("f", Parameters({}, "f"), handle)


def test_role_filter(handle):
    pods = [pod("a", role="both"), pod("p", role="prefill"), pod("d", role="decode")]
    default = RoleFilter.create("r", Parameters(None, "r"), handle)
    assert names(default.filter(req(), CycleState(), pods)) == ["a", "d"]
    prefill = RoleFilter.create("r", Parameters({"roles": ["prefill"]}, "r"), handle)
    assert names(prefill.filter(req(), CycleState(), pods)) == ["p"]
    with pytest.raises(ConfigError, match="allowed"):
        RoleFilter.create("r", Parameters({"roles": ["leader"]}, "r"), handle)


def scored(*pairs: tuple[str, float]) -> list[ScoredPod]:
    return [ScoredPod(pod(n), s) for n, s in pairs]


def test_max_score_picker_takes_the_best_and_breaks_ties_at_random():
    picker = MaxScorePicker("max", random.Random(3))
    assert picker.pick(req(), CycleState(), scored(("a", 0.2), ("b", 0.9), ("c", 0.5))).name == "b"
    tied = scored(("a", 0.7), ("b", 0.3), ("c", 0.7), ("d", 0.7 - 1e-12))
    picks = Counter(picker.pick(req(), CycleState(), tied).name for _ in range(3000))
    assert set(picks) == {"a", "c", "d"}  # never the lower score; float noise counts as a tie
    assert all(800 < n < 1200 for n in picks.values()), picks


def test_random_picker_ignores_scores():
    picker = RandomPicker("rnd", random.Random(5))
    picks = Counter(
        picker.pick(req(), CycleState(), scored(("a", 0.0), ("b", 1.0))).name
        for _ in range(2000)
    )
    assert set(picks) == {"a", "b"} and abs(picks["a"] - picks["b"]) < 300


def test_round_robin_picker_turns_in_name_order_as_pods_change():
    picker = RoundRobinPicker("rr")
    cands = scored(("c", 1.0), ("a", 0.0), ("b", 0.5))
    order = [picker.pick(req(), CycleState(), cands).name for _ in range(7)]
    assert order == ["a", "b", "c", "a", "b", "c", "a"]
    # "b" is excluded: after "a" comes "c"; a new pod "bb" takes its turn in name order.
    assert picker.pick(req(), CycleState(), scored(("a", 0), ("c", 0))).name == "c"
    four = scored(("a", 0), ("b", 0), ("bb", 0), ("c", 0))
    assert [picker.pick(req(), CycleState(), four).name for _ in range(4)] == ["a", "b", "bb", "c"]
    # Each pool keeps its own turn.
    assert picker.pick(req(pool="other"), CycleState(), four).name == "a"
