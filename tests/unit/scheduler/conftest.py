"""Shared helpers of the scheduler unit tests: pods, requests, a handle."""

from __future__ import annotations

import random
from typing import Any

import pytest

from infermesh.libs.scheduling.framework import Handle, Pod
from infermesh.libs.scheduling.metrics import SchedulerMetrics
from infermesh.proto.messages import LoraInfo, PodState, ScheduleRequest


def pod_state(name: str, pool: str = "default", model: str = "m", **kw: Any) -> PodState:
    """A ready heartbeat of pod ``name``."""
    return PodState(pod=name, pool=pool, model=model, url=f"http://{name}:8000", ts=0.0,
                    epoch="e", kv_seq=0, **kw)


def pod(name: str, inflight: int = 0, **kw: Any) -> Pod:
    """A candidate pod."""
    return Pod(name, pod_state(name, **kw), inflight)


def req(request_id: str = "r1", keys: list[int] | None = None, **kw: Any) -> ScheduleRequest:
    """A schedule request for model ``m`` in pool ``default``."""
    return ScheduleRequest(request_id=request_id, model="m", num_tokens=16 * len(keys or []),
                           block_keys=keys or [], **kw)


@pytest.fixture
def handle() -> Handle:
    """A handle with fresh metrics and a seeded random source (no indexer)."""
    return Handle(SchedulerMetrics(), None, random.Random(1))


__all__ = ["LoraInfo", "pod", "pod_state", "req"]
