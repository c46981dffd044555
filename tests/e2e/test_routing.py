"""Requests through the whole system: the OpenAI SDK via the ingress, precise prefix routing,
and a scheduler replica killed under load."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import aiohttp
import openai

from infermesh.libs.bus import connect, request
from infermesh.libs.tokenization import ModelTokenizer
from infermesh.proto.messages import LookupReply, LookupRequest, TokenizeReply, TokenizeRequest

from ..integration.helpers import wait_until

MODEL = "infermesh/tiny-llama"
BS = 16


def test_openai_sdk_through_the_ingress(stack_factory) -> None:
    stack = stack_factory(engines=2)
    client = openai.OpenAI(base_url=stack.ingress_url + "/v1", api_key="unused")
    models = [m.id for m in client.models.list().data]
    assert models == [MODEL]
    c = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    assert c.choices[0].text and c.usage.completion_tokens == 5
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and chunks[-1].usage.completion_tokens == 6
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert raw.headers["x-infermesh-endpoint"] in stack.pods
    assert float(raw.headers["x-infermesh-routing-ms"]) > 0


def _long_text(rng: random.Random, words: int) -> str:
    vocab = ("alpha beta gamma delta river stone cloud light north quiet engine market "
             "window garden silver paper").split()
    return " ".join(rng.choice(vocab) for _ in range(words))


async def _post(http: aiohttp.ClientSession, url: str, body: dict, profile: str | None = None):
    headers = {"x-infermesh-profile": profile} if profile else {}
    async with http.post(url + "/v1/completions", json=body, headers=headers) as r:
        data = await r.json()
        assert r.status == 200, data
        return r.headers["x-infermesh-endpoint"], data


async def test_shared_prefix_goes_to_the_engine_that_holds_it(stack_factory, model_dir) -> None:
    stack = stack_factory(engines=4)
    tok = ModelTokenizer.from_folder(model_dir)
    rng = random.Random(1)
    prefix = _long_text(rng, 700)
    n_prefix = len(tok.encode(prefix))
    assert n_prefix > 20 * BS
    async with aiohttp.ClientSession() as http:
        first_pod, _ = await _post(http, stack.ingress_url,
                                   {"model": MODEL, "prompt": prefix + " first", "max_tokens": 2})
        # The prefix's blocks reach the index through agent and bus within milliseconds; wait
        # for that so the follow-ups are not racing it (a racing one would seed a second pod).
        nc = await connect(stack.nats.url, "test")
        keys = (await request(nc, "im.tokenize", TokenizeRequest(
            model=MODEL, block_size=BS, prompt=prefix, return_token_ids=True),
            TokenizeReply)).block_keys

        async def indexed() -> bool:
            r = await request(nc, "im.index.lookup", LookupRequest(model=MODEL, block_keys=keys),
                              LookupReply)
            return any(m.pod == first_pod and m.blocks >= len(keys) - 1 for m in r.matches)

        await wait_until(indexed, what="prefix indexed")
        await nc.close()
        hits = Counter()
        cached = []
        for i in range(12):
            body = {"model": MODEL, "prompt": prefix + f" question {i} " + _long_text(rng, 20),
                    "max_tokens": 2}
            pod, data = await _post(http, stack.ingress_url, body)
            hits[pod] += 1
            cached.append(data["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert hits == {first_pod: 12}, hits
        assert max(cached) >= (n_prefix // BS - 1) * BS
        assert sorted(cached)[len(cached) // 2] >= (n_prefix // BS - 1) * BS
        # Those decisions came from the ingress's own scheduler replica and its replica of the
        # index (no bus hop).
        async with http.get(stack.ingress_url + "/metrics") as r:
            text = await r.text()
        local = [ln for ln in text.splitlines()
                 if ln.startswith('infermesh_scheduler_index_answers_total{where="local"}')]
        assert local and float(local[0].split()[-1]) >= 12, local
        # The random profile scatters the same traffic over the engines.
        spread = Counter()
        for i in range(24):
            body = {"model": MODEL, "prompt": prefix + f" again {i}", "max_tokens": 2}
            pod, _ = await _post(http, stack.ingress_url, body, profile="random")
            spread[pod] += 1
        assert len(spread) >= 3, spread


async def test_a_scheduler_replica_dies_under_load_and_no_request_fails(stack_factory) -> None:
    stack = stack_factory(engines=2, schedulers=2)
    rng = random.Random(2)
    results: list[int] = []
    killed = asyncio.Event()

    async def client(http: aiohttp.ClientSession, n: int) -> None:
        for _ in range(n):
            body = {"model": MODEL, "prompt": _long_text(rng, 60), "max_tokens": 3}
            async with http.post(stack.ingress_url + "/v1/completions", json=body) as r:
                await r.read()
                results.append(r.status)
            if len(results) == 60 and not killed.is_set():
                killed.set()
                stack.schedulers[0].kill()  # kill -9 one replica mid-stream

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(client(http, 40) for _ in range(6)))
    assert killed.is_set()
    assert len(results) == 240
    assert set(results) == {200}, Counter(results)
    assert stack.schedulers[1].alive()


async def test_a_fallback_scheduler_starts_its_local_index_with_its_first_request(
        stack_factory) -> None:
    """With the ingress deciding through the scheduler service (schedule_here off), the
    service follows no KV stream until asked; its first lookups go to the indexer service,
    later ones to its own index once in sync."""
    stack = stack_factory(engines=2, settings={"ingress": {"schedule_here": False}})
    sched = next(p for p in stack.system.plan.processes if p.kind == "scheduler")
    metrics_url = sched.health_url.replace("/health", "/metrics")
    rng = random.Random(3)
    prefix = _long_text(rng, 300)

    async def answers(http: aiohttp.ClientSession) -> dict[str, float]:
        async with http.get(metrics_url) as r:
            text = await r.text()
        out = {}
        for where in ("local", "service"):
            line = f'infermesh_scheduler_index_answers_total{{where="{where}"}}'
            out[where] = next((float(ln.split()[-1]) for ln in text.splitlines()
                               if ln.startswith(line)), 0.0)
        return out

    async with aiohttp.ClientSession() as http:
        assert await answers(http) == {"local": 0.0, "service": 0.0}
        await _post(http, stack.ingress_url, {"model": MODEL, "prompt": prefix, "max_tokens": 2})
        first = await answers(http)
        assert first == {"local": 0.0, "service": 1.0}, first  # not started before it

        async def local_answers() -> bool:
            await _post(http, stack.ingress_url,
                        {"model": MODEL, "prompt": prefix + " " + _long_text(rng, 5),
                         "max_tokens": 2})
            return (await answers(http))["local"] > 0

        await wait_until(local_answers, timeout=30, interval=0.2, what="local index answers")
