"""Prefill/decode disaggregation through the whole system on simulated engines speaking vLLM's
NIXL protocol (`infermesh up --prefill 2 --decode 2`): long prompts are prefilled on a prefill
engine and decoded on a decode engine with the KV it pulls, short ones are served whole, and
killing prefill engines mid-run loses no request."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import openai

MODEL = "infermesh/tiny-llama"
PREFILL = {"sim-0", "sim-1"}
DECODE = {"sim-2", "sim-3"}


def _text(rng: random.Random, words: int) -> str:
    vocab = ("alpha beta gamma delta river stone cloud light north quiet engine market "
             "window garden silver paper").split()
    return " ".join(rng.choice(vocab) for _ in range(words))


async def _complete(http: aiohttp.ClientSession, url: str, prompt: str,
                    stream: bool = False) -> tuple[int, dict[str, str], bytes]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": stream}
    async with http.post(url + "/v1/completions", json=body) as r:
        return r.status, dict(r.headers), await r.read()


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_long_prompts_are_disaggregated_and_survive_killed_prefill_engines(
        stack_factory) -> None:
    stack = stack_factory(engines=4, prefill=2, decode=2)
    url = stack.ingress_url
    rng = random.Random(5)
    async with aiohttp.ClientSession() as http:
        # A short prompt: served whole on a decode engine.
        status, headers, _ = await _complete(http, url, "hello there")
        assert status == 200 and headers["x-infermesh-endpoint"] in DECODE
        assert "x-infermesh-prefill-endpoint" not in headers
        # A long, never-seen prompt (≥ 512 uncached tokens): prefilled elsewhere.
        status, headers, data = await _complete(http, url, _text(rng, 900))
        assert status == 200, data
        dec, pre = headers["x-infermesh-endpoint"], headers["x-infermesh-prefill-endpoint"]
        assert dec in DECODE and pre in PREFILL
        # The decode engine took the prompt by KV transfer, not by computing it (vLLM's
        # metric), and the prefill engine did compute it.
        engines = {f"sim-{e['index']}": e["http"] for e in stack.engines}
        async with http.get(engines[dec] + "/metrics") as r:
            dm = await r.text()
        assert _metric(dm, "vllm:prompt_tokens_by_source_total",
                       source="external_kv_transfer") > 500
        assert _metric(dm, "vllm:prompt_tokens_by_source_total", source="local_compute") < 64
        async with http.get(engines[pre] + "/metrics") as r:
            pm = await r.text()
        assert _metric(pm, "vllm:prompt_tokens_by_source_total", source="local_compute") > 500
        # Streamed through the OpenAI SDK, one answer.
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
        stream = await client.completions.create(model=MODEL, prompt=_text(rng, 800),
                                                 max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6

        # A decode engine killed: a request sent to it is retried on the other decode engine
        # before any byte reached the client, which computes the prompt itself.
        sims = {p.name: p for p in stack.system.procs("sim")}
        sims["sim-2"].kill()
        results = await asyncio.gather(*(_complete(http, url, _text(rng, 700), stream=i % 2 == 0)
                                         for i in range(6)))
        assert [s for s, _, _ in results] == [200] * 6, [d[:200] for _, _, d in results]
        assert {h["x-infermesh-endpoint"] for _, h, _ in results} <= DECODE

        # One prefill engine killed mid-run: requests are retried on the other, or decoded
        # whole; none is lost.
        sims["sim-0"].kill()
        results = await asyncio.gather(*(_complete(http, url, _text(rng, 700), stream=i % 2 == 1)
                                         for i in range(8)))
        assert [s for s, _, _ in results] == [200] * 8, [d[:200] for _, _, d in results]
        assert all(h["x-infermesh-endpoint"] in DECODE for _, h, _ in results)
        assert all(h.get("x-infermesh-prefill-endpoint") in (None, "sim-1") for _, h, _ in results)
        for _, _, body in results:
            assert b"error" not in body
        # Both gone: served whole by the decode engines.
        sims["sim-1"].kill()
        results = await asyncio.gather(*(_complete(http, url, _text(rng, 700))
                                         for _ in range(6)))
        assert [s for s, _, _ in results] == [200] * 6
        assert all("x-infermesh-prefill-endpoint" not in h for _, h, _ in results)
        async with http.get(url + "/metrics") as r:
            im = await r.text()
        outcomes = {o: _metric(im, "infermesh_ingress_pd_requests_total", outcome=o) for o in (
            "disaggregated", "prefill_retried", "prefill_failed", "decode_retried_whole")}
        print("P/D outcomes at the ingress:", outcomes)
        assert outcomes["decode_retried_whole"] >= 1 and outcomes["prefill_failed"] >= 1
        served = sum(_metric(im, "infermesh_ingress_pd_requests_total", outcome=o)
                     for o in ("disaggregated", "prefill_failed"))
        assert served >= 2
