"""The chaos hop's dice: each fault does what it says, per pod and reproducibly, and held-back
batches come out when faults are switched off; bad settings are refused."""

from __future__ import annotations

from typing import Any

import pytest
from nats.micro.request import ServiceError

from infermesh.services.tools.kvchaos import ChaosConfig, ChaosControl, KVChaos


class Sent:
    """Stands in for the NATS client: records what the hop publishes (no bus in a unit test)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, data: bytes, **_: Any) -> None:
        self.messages.append((subject, data))


def hop(**kw: Any) -> KVChaos:
    return KVChaos(ChaosConfig(**kw), nc=Sent())  # type: ignore[arg-type]


def stream(h: KVChaos, n: int, pod: str = "p") -> list[int]:
    """Route batches 1..n of one pod; return the seqs sent on, in order."""
    out = []
    for seq in range(1, n + 1):
        for _, data, _ in h.route(pod, f"im.kv.default.{pod}", str(seq).encode(), None):
            out.append(int(data))
    return out


def test_no_faults_forwards_everything_in_order() -> None:
    h = hop()
    assert stream(h, 50) == list(range(1, 51))
    assert h.stats.received == h.stats.forwarded == 50


def test_drop_loses_batches_and_nothing_else() -> None:
    h = hop(drop=0.3)
    out = stream(h, 1000)
    assert out == sorted(set(out))
    assert h.stats.dropped == 1000 - len(out) and 200 < h.stats.dropped < 400


def test_duplicate_sends_copies_at_most_a_few_batches_later() -> None:
    h = hop(duplicate=0.3, duplicate_delay=3)
    out = stream(h, 1000)
    assert sorted(set(out)) == list(range(1, 1001))
    assert len(out) - 1000 == h.stats.duplicated > 200
    # A copy goes out after at most 3 newer batches arrived: nothing newer than seq + 3 before it.
    first = {s: out.index(s) for s in set(out)}
    copies = [(i, s) for i, s in enumerate(out) if i != first[s]]
    assert all(max(out[:i]) <= s + 3 for i, s in copies)
    assert any(max(out[:i]) > s + 1 for i, s in copies)  # some copies did wait


def test_reorder_holds_a_batch_back_behind_the_next_ones() -> None:
    h = hop(reorder=0.2, reorder_depth=2)
    out = stream(h, 1000)
    assert out != sorted(out) and h.stats.reordered > 100
    assert len(out) + h.held() == 1000 and len(set(out)) == len(out)
    # A held batch goes out once the next 2 have arrived: nothing newer than seq + 2 before it.
    assert all(max(out[: i + 1]) <= s + 2 for i, s in enumerate(out))
    assert any(max(out[: i + 1]) == s + 2 for i, s in enumerate(out))


def test_same_seed_same_faults_per_pod_and_pods_differ() -> None:
    a, b = hop(drop=0.5, seed=3), hop(drop=0.5, seed=3)
    assert stream(a, 200, "p1") == stream(b, 200, "p1")
    assert stream(a, 200, "p2") != stream(hop(drop=0.5, seed=3), 200, "p1")


async def test_switching_faults_off_releases_what_is_held() -> None:
    h = hop(reorder=1.0, reorder_depth=5)
    stream(h, 3)
    assert h.held() == 3
    status = await h._on_control(ChaosControl(reorder=0.0))
    assert status.held == 0 and status.counts["released"] == 3
    assert [int(d) for _, d in h._nc.messages] == [1, 2, 3]  # type: ignore[union-attr]
    assert stream(h, 2) == [1, 2]


async def test_bad_settings_are_refused() -> None:
    h = hop()
    for bad in (ChaosControl(drop=1.5), ChaosControl(drop=0.6, reorder=0.6),
                ChaosControl(duplicate=-0.1)):
        with pytest.raises(ServiceError):
            await h._on_control(bad)
    assert h.drop == h.reorder == h.duplicate == 0.0
    for kw in ({"drop": 2.0}, {"reorder_depth": 0}, {"from_prefix": "im"},
               {"to_prefix": "a b"}):
        with pytest.raises(ValueError):
            ChaosConfig(**kw)


async def test_stopping_releases_what_is_held() -> None:
    h = hop(duplicate=1.0, duplicate_delay=50)
    stream(h, 2)
    assert h.held() == 2
    await h.stop()
    assert [int(d) for _, d in h._nc.messages] == [1, 2]  # type: ignore[union-attr]
    assert h.held() == 0 and h.stats.released == 2


async def test_names_no_agent_may_use_are_counted_not_forwarded() -> None:
    from types import SimpleNamespace

    h = hop()
    await h._on_kv(SimpleNamespace(subject="raw.kv.default.bad$pod", data=b"x", headers=None))
    await h._on_pod(SimpleNamespace(subject="raw.pod.po%ol.p", data=b"x", headers=None))
    await h._on_kv(SimpleNamespace(subject="raw.kv.default.good", data=b"x", headers=None))
    assert h.stats.bad_subjects == 2
    assert h._nc.messages == [("im.kv.default.good", b"x")]  # type: ignore[union-attr]
