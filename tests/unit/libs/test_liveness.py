"""The shared rule for silent pods: late is not dead; a blackout of everyone drops nobody."""

from __future__ import annotations

import pytest

from infermesh.libs import liveness


def test_dead_needs_a_long_silence_beside_a_steady_speaker() -> None:
    heard = {"a": (100.0, 80.0), "b": (89.0, 50.0)}  # a steady since 80, b silent since 89
    assert liveness.dead(heard, 100.0, 1.0, 10.0) == ["b"]
    assert liveness.dead(heard, 100.0, 1.0, 12.0) == []  # 11 s of silence < 12
    # a speaks, but only since 95: its voice does not cover b's whole silence.
    assert liveness.dead({"a": (100.0, 95.0), "b": (89.0, 50.0)}, 100.0, 1.0, 10.0) == []
    # Nobody fresh: a silence of everyone says nothing about any one pod.
    assert liveness.dead({"a": (98.0, 50.0), "b": (80.0, 50.0)}, 100.0, 1.0, 10.0) == []
    assert liveness.dead({}, 100.0, 1.0, 10.0) == []


def test_since_restarts_after_a_gap_longer_than_late() -> None:
    assert liveness.since(10.0, 5.0, 10.5, 1.0) == 5.0
    assert liveness.since(10.0, 5.0, 11.5, 1.0) == 11.5


def test_late_counts_and_check_times() -> None:
    assert liveness.late([10.0, 9.5, 8.0], 10.0, 1.0) == 1
    liveness.check_times(1.0, 10.0)
    with pytest.raises(ValueError, match="pod_late_s"):
        liveness.check_times(11.0, 10.0)
    with pytest.raises(ValueError):
        liveness.check_times(0.0, 10.0)
