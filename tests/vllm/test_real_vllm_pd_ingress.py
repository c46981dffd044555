"""Prefill/decode disaggregation behind the ingress on real vLLM: `infermesh up --engine vllm
--prefill 1 --decode 1` through the system plan. A long prompt sent to the ingress is prefilled
on the prefill engine and decoded on the decode engine with the KV it pulls over NIXL (vLLM's own
metrics say so), and the answer streams to the OpenAI SDK; a short one is served whole."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest

from infermesh.services.system.plan import VLLM_CPU_BLOCK_SIZE, plan
from infermesh.services.system.run import LocalSystem
from infermesh.services.system.spec import SystemSpec

from .test_real_vllm import MODEL, _needs_vllm

PREFILL, DECODE = "vllm-0", "vllm-1"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    _needs_vllm()
    from infermesh.libs.tinymodel import ensure_model_folder

    if not (ensure_model_folder() / "model.safetensors").exists():
        pytest.fail("the tiny model has no weights: `make vllm-env` adds them")
    tmp: Path = tmp_path_factory.mktemp("real-vllm-pd")
    s = LocalSystem(plan(SystemSpec(
        engine="vllm", prefill=1, decode=1, block_size=VLLM_CPU_BLOCK_SIZE, num_gpu_blocks=96,
        free_ports=True, nats_auth=False, console=False, state_dir=str(tmp / "system"))))
    try:
        s.start(timeout=300)  # two engines start side by side on 2 cores
        yield s
    finally:
        s.stop()


def _words(rng: random.Random, n: int) -> str:
    vocab = "alpha beta gamma delta river stone cloud light north quiet engine market".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


def _sum(text: str, name: str, **labels: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{")
               and all(f'{k}="{v}"' in line for k, v in labels.items()))


async def test_a_long_prompt_is_prefilled_on_one_engine_and_decoded_on_the_other(
        system: LocalSystem) -> None:
    lay = system.plan.layout
    engine = {PREFILL: f"http://127.0.0.1:{lay.engine_http[0]}",
              DECODE: f"http://127.0.0.1:{lay.engine_http[1]}"}
    rng = random.Random(11)
    client = openai.AsyncOpenAI(base_url=system.url + "/v1", api_key="unused", timeout=120)
    # Not streamed: the headers name both engines.
    raw = await client.completions.with_raw_response.create(
        model=MODEL, prompt=_words(rng, 900), max_tokens=4)
    assert raw.headers["x-infermesh-endpoint"] == DECODE
    assert raw.headers["x-infermesh-prefill-endpoint"] == PREFILL
    done = raw.parse()
    assert done.choices[0].text and done.usage is not None
    prompt = done.usage.prompt_tokens
    assert prompt > 600
    async with aiohttp.ClientSession() as http:
        async with http.get(engine[DECODE] + "/metrics") as r:
            dm = await r.text()
        async with http.get(engine[PREFILL] + "/metrics") as r:
            pm = await r.text()
    # The decode engine did not compute the prompt: it came by NIXL from the prefill engine.
    by_source = "vllm:prompt_tokens_by_source_total"
    assert _sum(dm, by_source, source="external_kv_transfer") >= prompt - VLLM_CPU_BLOCK_SIZE
    assert _sum(dm, by_source, source="local_compute") <= VLLM_CPU_BLOCK_SIZE
    assert _sum(dm, "vllm:nixl_bytes_transferred_sum") > 0
    assert _sum(pm, by_source, source="local_compute") >= prompt - VLLM_CPU_BLOCK_SIZE

    # Streamed to the SDK: one answer, from the decode engine.
    stream = await client.completions.create(
        model=MODEL, prompt=_words(rng, 900), max_tokens=8, stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    async with aiohttp.ClientSession() as http:
        async with http.get(engine[DECODE] + "/metrics") as r:
            dm2 = await r.text()
    assert _sum(dm2, by_source, source="external_kv_transfer") > _sum(
        dm, by_source, source="external_kv_transfer")

    # A short prompt is served whole by the decode engine (below the decider's threshold).
    raw = await client.completions.with_raw_response.create(
        model=MODEL, prompt="hello there", max_tokens=2)
    assert raw.headers["x-infermesh-endpoint"] == DECODE
    assert "x-infermesh-prefill-endpoint" not in raw.headers
