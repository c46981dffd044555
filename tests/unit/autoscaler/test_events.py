"""The autoscaler's reading of request events (no bus): the SLO window sees TTFTs without the
time the activator held a request for a first engine."""

from __future__ import annotations

import time

from infermesh.proto.messages import RequestEvent
from infermesh.services.autoscaler.config import AutoscalerConfig
from infermesh.services.autoscaler.service import AutoscalerService


def _event(kind: str, rid: str, **kw: object) -> RequestEvent:
    return RequestEvent(kind=kind, request_id=rid, pod="p0", pool="default",  # type: ignore[arg-type]
                        model="m", ts=time.time(), **kw)


def test_the_slo_window_leaves_out_the_time_held_for_a_first_engine() -> None:
    cfg = AutoscalerConfig(mode="slo", ttft_p90_target_s=1.0, slo_min_samples=5, lease=False,
                           http_port=-1)
    svc = AutoscalerService(cfg)
    now = time.monotonic()
    # Ten requests held 30 s at zero replicas (a cold start), each then served in 0.2 s.
    for i in range(10):
        svc.apply_event(_event("routed", f"r{i}"), now)
        svc.apply_event(_event("first_token", f"r{i}", ttft_s=30.2, held_s=30.0), now)
        svc.apply_event(_event("finished", f"r{i}", output_tokens=5), now)
    pool = svc.pools["default"]
    view = pool.window.view(now, pool.decider.targets)
    assert view.ttft_p90_s is not None and abs(view.ttft_p90_s - 0.2) < 1e-6
    assert not view.missed  # the engines met the target; the cold start is not theirs
    # Requests that were not held count in full: 2 s against a 1 s target is missed.
    for i in range(10, 30):
        svc.apply_event(_event("routed", f"r{i}"), now)
        svc.apply_event(_event("first_token", f"r{i}", ttft_s=2.0), now)
    assert pool.window.view(now, pool.decider.targets).missed
