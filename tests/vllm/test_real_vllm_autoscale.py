"""Scale from zero with a real vLLM engine: a pool with no engine, a chat request arrives, the
ingress holds it and tells the autoscaler, the local actuator starts the slot's agent, the agent
launches `vllm serve`, and the request is answered once the engine is ready."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import openai

from infermesh.services.system.plan import VLLM_CPU_BLOCK_SIZE, plan
from infermesh.services.system.run import LocalSystem
from infermesh.services.system.spec import SystemSpec

from .test_real_vllm import GPU_BLOCKS, MODEL, _needs_vllm


async def test_a_chat_at_zero_replicas_starts_vllm_and_is_answered(tmp_path: Path) -> None:
    _needs_vllm()
    system = LocalSystem(plan(SystemSpec(
        engine="vllm", engines=0, autoscale=True, block_size=VLLM_CPU_BLOCK_SIZE,
        num_gpu_blocks=GPU_BLOCKS, free_ports=True, nats_auth=False,
        state_dir=str(tmp_path / "system"),
        settings={"autoscaler": {"min_replicas": 0, "max_replicas": 1, "interval_s": 0.25,
                                 "warmup_s": 0.5, "scale_to_zero_after_s": 600},
                  "ingress": {"no_pod_wait_s": 300}})))
    try:
        system.start(timeout=120)  # no engine to wait for
        assert system.actuator is not None
        assert not any(s.running for s in system.actuator.slots)
        client = openai.AsyncOpenAI(base_url=system.url + "/v1", api_key="unused",
                                    timeout=330, max_retries=0)
        t0 = time.monotonic()
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hello from zero"}],
            max_tokens=4)
        waited = time.monotonic() - t0
        chat = raw.parse()
        assert raw.headers["x-infermesh-endpoint"] == "vllm-0"
        assert chat.usage is not None and chat.usage.completion_tokens == 4
        print(f"chat at zero replicas answered by real vLLM after {waited:.1f} s "
              "(the engine's start included)")
        assert [w for _, w in system.actuator.slots[0].history] == ["started"]
        async with aiohttp.ClientSession() as http:
            async with http.get(system.url + "/metrics") as r:
                text = await r.text()
        assert 'infermesh_ingress_holds_total{outcome="released"} 1.0' in text
    finally:
        system.stop()
