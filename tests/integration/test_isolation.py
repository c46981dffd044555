"""A huge prompt sent to one engine stalls no other engine and drops no pod: simulated engines
run one process each (on a machine with 2+ CPUs), the simulator tokenizes big prompts off its
event loop, and heartbeats keep going while an engine is busy."""

from __future__ import annotations

import asyncio
import signal

import aiohttp

from infermesh.libs.bus import NatsServer

from ..conftest import ProcessManager
from ..stack import start_stack

MODEL = "infermesh/tiny-llama"


async def test_a_huge_prompt_on_one_engine_stalls_no_pod(procs: ProcessManager,
                                                         nats_server: NatsServer) -> None:
    stack = start_stack(procs, nats_server, engines=2, sim_processes="each")
    assert len(stack.system.plan.of_kind("sim")) == 2  # one process per engine
    engine0, engine1 = (e["http"] for e in stack.engines)
    prompt = "The quick brown fox jumps over the lazy dog. " * 25_000  # 1.1 MB
    probes: list[tuple[str, bool]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def send() -> tuple[int, str]:
            async with http.post(f"{engine0}/v1/completions", json={
                    "model": MODEL, "prompt": prompt, "max_tokens": 1}) as r:
                return r.status, await r.text()

        big = asyncio.create_task(send())
        await asyncio.sleep(0.05)
        while not big.done():
            for name, url in (("engine 0", engine0), ("engine 1", engine1)):
                async with http.get(f"{url}/health") as r:
                    probes.append((name, r.status == 200))
            async with http.get(f"{stack.ingress_url}/health") as r:
                body = await r.json()
                probes.append(("ingress sees both pods", body.get("pods") == 2))
        status, text = await big
        # Over the engines' max_model_len (vLLM's own 400) or served: either way an answer.
        assert status in (200, 400), text
    assert probes, "the huge request finished before anything was probed"
    assert all(ok for _, ok in probes), [p for p in probes if not p[1]]


async def test_a_stalled_engine_process_stalls_no_other_engine(
        procs: ProcessManager, nats_server: NatsServer) -> None:
    """An engine that stops answering altogether (its process frozen) leaves the others
    serving: with all engines in one process, engine 1 would freeze with engine 0."""
    stack = start_stack(procs, nats_server, engines=2, sim_processes="each")
    frozen = stack.system.proc("sim-0")
    engine1 = stack.engines[1]["http"]
    frozen.send_signal(signal.SIGSTOP)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.post(f"{engine1}/v1/completions", json={
                    "model": MODEL, "prompt": "Hello", "max_tokens": 2}) as r:
                assert r.status == 200, await r.text()
    finally:
        frozen.send_signal(signal.SIGCONT)
