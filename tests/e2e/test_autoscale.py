"""The autoscaler in the whole system (`up --autoscale`'s plan): real simulated engines queue
under a burst, their agents' heartbeats carry it, and the autoscaler's decision on
im.scale.<pool> goes up; when the burst is served it comes back down to min_replicas.

The local actuator then carries the decisions out on the plan's engine slots: engines started
under load and drained when it goes, and a pool at zero started by a held request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from infermesh.libs.bus import connect
from infermesh.proto import codec
from infermesh.proto.messages import PodState, ScaleDecision

from ..integration.helpers import wait_until

MODEL = "infermesh/tiny-llama"


async def test_a_burst_scales_the_pool_up_and_its_end_back_down(stack_factory) -> None:
    """Two autoscaler replicas (one leads: the lease); the leader is killed once the burst has
    scaled the pool up, and the other carries on: its decisions, the scale-down included."""
    fast = {"interval_s": 0.25, "warmup_s": 0.5, "scale_up_cooldown_s": 1,
            "scale_down_cooldown_s": 1, "scale_down_stabilization_s": 2, "max_replicas": 6,
            "lease_ttl_s": 1.5}
    # Two engines running 2 sequences each (the rest wait), 7 ms a token in real time.
    stack = stack_factory(engines=2, time_scale=1.0, autoscale=True, autoscalers=2,
                          settings={"autoscaler": fast, "sim": {"max_num_seqs": 2}})
    replicas = {p.pid: p for name, p in stack.system.supervisor.procs.items()
                if name.startswith("autoscaler-")}
    assert len(replicas) == 2
    decisions: list[ScaleDecision] = []

    async def on_scale(msg: Any) -> None:
        if b"decision" in msg.data:
            decisions.append(codec.decode(msg.data, ScaleDecision))

    nc = await connect(stack.nats.url, "test-watch")
    try:
        await nc.subscribe("im.scale.default", cb=on_scale)
        await wait_until(lambda: bool(decisions) and decisions[-1].ready_replicas == 2, 30,
                         "the autoscaler counting both engines")
        before = decisions[-1].target_replicas
        assert before <= 2

        async with aiohttp.ClientSession() as http:

            async def one(i: int) -> int:
                body = {"model": MODEL, "prompt": f"request {i} " + "word " * 50,
                        "max_tokens": 120, "ignore_eos": True}
                async with http.post(stack.ingress_url + "/v1/completions", json=body) as r:
                    await r.read()
                    return r.status

            burst = asyncio.gather(*(one(i) for i in range(28)))
            # 28 requests on 4 running slots: about 12 waiting per engine (saturated at 5).
            await wait_until(lambda: decisions[-1].target_replicas > 2, 30,
                             "a scale-up under the burst")
            up = decisions[-1]
            assert up.reason.startswith("saturated"), up.reason
            assert up.inputs["waiting"] >= 5 and up.inputs["spare_queue"] < 3
            # Exactly one replica publishes; kill it (the supervisor brings it back later,
            # as a follower).
            assert len({d.replica for d in decisions}) == 1
            leader = up.replica
            replicas[int(leader.rsplit("-", 1)[1])].kill()
            n = len(decisions)
            await wait_until(lambda: any(d.replica != leader for d in decisions[n:]), 15,
                             "the other replica taking over")
            statuses = await burst
        assert statuses == [200] * 28
        await wait_until(lambda: decisions[-1].target_replicas == 1, 30,
                         "back down to min_replicas once served")
        successor = next(d.replica for d in decisions[n:] if d.replica != leader)
        assert decisions[-1].replica == successor
        assert {d.replica for d in decisions[n:]} <= {leader, successor}
        # Up, then only down: no flapping on the way.
        targets = [d.target_replicas for d in decisions]
        peak = targets.index(max(targets))
        assert targets[peak:] == sorted(targets[peak:], reverse=True), targets
    finally:
        await nc.close()


async def _ready_pods(nc: Any) -> dict[str, bool]:
    """pod → ready, from the pool's heartbeats (kept up to date by a subscription)."""
    ready: dict[str, bool] = {}

    async def on_pod(msg: Any) -> None:
        st = codec.decode(msg.data, PodState)
        ready[st.pod] = st.ready

    await nc.subscribe("im.pod.default.*", cb=on_pod)
    return ready


async def test_the_local_actuator_adds_engines_under_load_and_drains_them_after(
        stack_factory) -> None:
    """One engine of three slots: a burst makes the autoscaler ask for more and the actuator
    starts them; once served, they are drained and stopped while requests keep coming, and
    none fails."""
    fast = {"interval_s": 0.25, "warmup_s": 0.5, "scale_up_cooldown_s": 1,
            "scale_down_cooldown_s": 1, "scale_down_stabilization_s": 2, "max_replicas": 3}
    stack = stack_factory(engines=1, time_scale=1.0, autoscale=True,
                          settings={"autoscaler": fast, "sim": {"max_num_seqs": 2}})
    actuator = stack.system.actuator
    assert [s.running for s in actuator.slots] == [True, False, False]
    nc = await connect(stack.nats.url, "test-watch")
    statuses: list[int] = []
    try:
        ready = await _ready_pods(nc)
        async with aiohttp.ClientSession() as http:

            async def one(body: dict[str, Any]) -> None:
                async with http.post(stack.ingress_url + "/v1/completions", json=body) as r:
                    await r.read()
                    statuses.append(r.status)

            burst = asyncio.gather(*(one({"model": MODEL, "prompt": f"burst {i} " * 20,
                                          "max_tokens": 120, "ignore_eos": True})
                                     for i in range(20)))
            await wait_until(lambda: sum(ready.values()) == 3, 60, "three engines ready")
            await burst
            # A trickle of requests while the pool scales back down: none may fail.
            trickle_on = True

            async def trickle() -> None:
                i = 0
                while trickle_on:
                    await one({"model": MODEL, "prompt": f"small {i}", "max_tokens": 4})
                    i += 1
                    await asyncio.sleep(0.1)

            task = asyncio.create_task(trickle())
            await wait_until(lambda: [s.running for s in actuator.slots] == [True, False, False],
                             60, "back to one engine")
            trickle_on = False
            await task
        assert statuses and set(statuses) == {200}, statuses
        for slot in actuator.slots[1:]:
            what = [w for _, w in slot.history]
            assert what == ["started", "draining", "stopped"], (slot.pod, what)
        assert not ready["sim-1"] and not ready["sim-2"]
    finally:
        await nc.close()


async def test_from_zero_a_held_request_is_served_and_the_pool_goes_back_to_zero(
        stack_factory) -> None:
    """A pool at zero: the ingress holds the request and tells its demand, the autoscaler asks
    for one engine, the actuator starts it, the request is answered; idle again, the engine is
    drained and stopped."""
    fast = {"interval_s": 0.25, "warmup_s": 0.5, "min_replicas": 0, "max_replicas": 2,
            "scale_to_zero_after_s": 2, "scale_down_cooldown_s": 1,
            "scale_down_stabilization_s": 1}
    stack = stack_factory(engines=0, time_scale=0.05, autoscale=True,
                          settings={"autoscaler": fast, "ingress": {"no_pod_wait_s": 60}})
    actuator = stack.system.actuator
    assert not any(s.running for s in actuator.slots)
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.ingress_url + "/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 5}) as r:
            body = await r.json()
            status = r.status
    waited = time.monotonic() - t0
    assert status == 200 and body["choices"][0]["message"]["content"], body
    print(f"request at zero replicas answered after {waited:.2f} s (engine start included)")
    assert actuator.slots[0].running
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.ingress_url + "/metrics") as r:
            text = await r.text()
    assert 'infermesh_ingress_holds_total{outcome="released"} 1.0' in text
    await wait_until(lambda: not actuator.slots[0].running, 60, "back to zero")
    assert [w for _, w in actuator.slots[0].history] == ["started", "draining", "stopped"]
