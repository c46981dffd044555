"""LoRA routing: the lora-filter keeps a request on the engines serving its adapter, the
lora-affinity scorer prefers those holding it, and the built-in `lora` profile wires both."""

from __future__ import annotations

from infermesh.libs.scheduling.config import load_pipeline
from infermesh.libs.scheduling.framework import CycleState
from infermesh.libs.scheduling.metrics import SchedulerMetrics
from infermesh.libs.scheduling.plugins import LoraAffinityScorer, LoraFilter, RoleFilter
from infermesh.libs.scheduling.scheduler import Scheduler
from infermesh.proto.messages import LoraInfo

from .conftest import pod, req


def test_filter_keeps_the_engines_serving_the_adapter() -> None:
    f = LoraFilter("lora")
    pods = [
        pod("holds", adapters=["x"], lora=LoraInfo(loaded=["x"])),
        pod("on-demand", adapters=["x", "y"]),  # in its LoRA directory
        pod("running", lora=LoraInfo(running=["x"])),  # an agent older than `loaded`
        pod("other", adapters=["y"], lora=LoraInfo(loaded=["y"])),
        pod("plain"),
    ]
    kept = [p.name for p in f.filter(req(lora_name="x"), CycleState(), pods)]
    assert kept == ["holds", "on-demand", "running"]
    # nobody serves it: every pod stays (the engine's own answer decides)
    assert f.filter(req(lora_name="nope"), CycleState(), pods) == pods
    # no adapter: no filtering
    assert f.filter(req(), CycleState(), pods) == pods


async def test_affinity_prefers_residency() -> None:
    s = LoraAffinityScorer("lora-affinity")
    pods = [
        pod("run", lora=LoraInfo(running=["x"], loaded=["x"], max_lora=2)),
        pod("loaded", lora=LoraInfo(loaded=["x"], max_lora=2)),
        pod("wait", lora=LoraInfo(waiting=["x"], max_lora=2)),
        pod("room", adapters=["x"], lora=LoraInfo(running=["y"], max_lora=2)),
    ]
    assert await s.score(req(lora_name="x"), CycleState(), pods) == {
        "run": 1.0, "loaded": 0.9, "wait": 0.8, "room": 0.5}


async def test_the_default_profile_routes_to_the_engine_holding_the_adapter(handle) -> None:
    p = load_pipeline(None, handle)
    prof = p.profiles["default"]
    assert [type(f) for f in prof.filters] == [RoleFilter, LoraFilter]
    assert ("lora-affinity-scorer", 1.0) in [(s.type_name, w) for s, w in prof.scorers]
    sched = Scheduler(p, SchedulerMetrics())
    pods = [pod("cold", adapters=["x"]),  # could load x on demand
            pod("base"),  # does not serve x
            pod("warm", adapters=["x"], lora=LoraInfo(loaded=["x"], max_lora=4))]
    for i in range(5):
        d = await sched.schedule(req(f"r{i}", lora_name="x"), pods)
        assert d.pod == "warm"
