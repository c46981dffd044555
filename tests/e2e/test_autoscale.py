"""The autoscaler in the whole system (`up --autoscale`'s plan): real simulated engines queue
under a burst, their agents' heartbeats carry it, and the autoscaler's decision on
im.scale.<pool> goes up; when the burst is served it comes back down to min_replicas.

(No actuator yet: the decision is what is tested; engines are not started or stopped.)"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from infermesh.libs.bus import connect
from infermesh.proto import codec
from infermesh.proto.messages import ScaleDecision

from ..integration.helpers import wait_until

MODEL = "infermesh/tiny-llama"


async def test_a_burst_scales_the_pool_up_and_its_end_back_down(stack_factory) -> None:
    fast = {"interval_s": 0.25, "warmup_s": 0.5, "scale_up_cooldown_s": 1,
            "scale_down_cooldown_s": 1, "scale_down_stabilization_s": 2, "max_replicas": 6}
    # Two engines running 2 sequences each (the rest wait), 7 ms a token in real time.
    stack = stack_factory(engines=2, time_scale=1.0, autoscale=True,
                          settings={"autoscaler": fast, "sim": {"max_num_seqs": 2}})
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
            statuses = await burst
        assert statuses == [200] * 28
        await wait_until(lambda: decisions[-1].target_replicas == 1, 30,
                         "back down to min_replicas once served")
        # Up, then only down: no flapping on the way.
        targets = [d.target_replicas for d in decisions]
        peak = targets.index(max(targets))
        assert targets[peak:] == sorted(targets[peak:], reverse=True), targets
    finally:
        await nc.close()
