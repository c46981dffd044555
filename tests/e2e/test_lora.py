"""LoRA end to end on simulated engines (`infermesh up --loras a`): a request for an adapter
lands on the engine holding it, follows it when it is loaded and unloaded at runtime, and
adapter-keyed prefix blocks credit only prompts for the same adapter."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from infermesh.libs.bus import connect, request
from infermesh.libs.tinymodel import build_adapter
from infermesh.proto.messages import LookupReply, LookupRequest, TokenizeReply, TokenizeRequest

from ..integration.helpers import BusWatcher, until_adapters, wait_until
from ..stack import Stack

MODEL = "infermesh/tiny-llama"
BS = 16


def _text(rng: random.Random, words: int) -> str:
    vocab = ("alpha beta gamma delta river stone cloud light north quiet engine market "
             "window garden silver paper").split()
    return " ".join(rng.choice(vocab) for _ in range(words))


async def _complete(http: aiohttp.ClientSession, stack: Stack, model: str,
                    prompt: str) -> tuple[str, dict[str, Any]]:
    body = {"model": model, "prompt": prompt, "max_tokens": 2}
    async with http.post(stack.ingress_url + "/v1/completions", json=body) as r:
        data = await r.json()
        assert r.status == 200, data
        return r.headers["x-infermesh-endpoint"], data


async def _engine_post(http: aiohttp.ClientSession, base: str, path: str, body: dict) -> None:
    async with http.post(base + path, json=body) as r:
        assert r.status == 200, await r.text()


async def test_an_adapter_request_lands_on_the_engine_holding_it(stack_factory, model_dir: Path,
                                                                 tmp_path: Path) -> None:
    stack = stack_factory(engines=3, loras=["a"])
    sims = {p: e["http"] for p, e in zip(stack.pods, stack.engines, strict=True)}
    rng = random.Random(7)
    nc = await connect(stack.nats.url, "test")
    watcher = await BusWatcher(nc).start()
    try:
        async with aiohttp.ClientSession() as http:
            # Only sim-0 keeps `a` loaded; the others can still load it on demand (it is in
            # the LoRA directory), so the lora-affinity scorer, not the filter, decides.
            for pod in ("sim-1", "sim-2"):
                await _engine_post(http, sims[pod], "/v1/unload_lora_adapter", {"lora_name": "a"})
            for pod in ("sim-1", "sim-2"):
                await until_adapters(watcher, pod, set(), {"a"})
            assert "a" in watcher.states["sim-1"].adapters  # loadable on demand
            hits = Counter([(await _complete(http, stack, "a", _text(rng, 40)))[0]
                            for _ in range(6)])
            assert hits == {"sim-0": 6}, hits

            # `z` lives outside the LoRA directory: only an engine that loaded it serves it.
            z = build_adapter(tmp_path / "z", "z", model_dir)
            await _engine_post(http, sims["sim-2"], "/v1/load_lora_adapter",
                               {"lora_name": "z", "lora_path": str(z)})
            await until_adapters(watcher, "sim-2", {"z"}, set())
            hits = Counter([(await _complete(http, stack, "z", _text(rng, 40)))[0]
                            for _ in range(6)])
            assert hits == {"sim-2": 6}, hits

            # Moved at runtime: unloaded there, loaded on sim-1; the routing follows.
            await _engine_post(http, sims["sim-1"], "/v1/load_lora_adapter",
                               {"lora_name": "z", "lora_path": str(z)})
            await _engine_post(http, sims["sim-2"], "/v1/unload_lora_adapter", {"lora_name": "z"})
            await until_adapters(watcher, "sim-1", {"z"}, set())
            await until_adapters(watcher, "sim-2", set(), {"z"})
            hits = Counter([(await _complete(http, stack, "z", _text(rng, 40)))[0]
                            for _ in range(6)])
            assert hits == {"sim-1": 6}, hits
    finally:
        await nc.close()


async def test_adapter_keyed_prefix_blocks_credit_only_same_adapter_prompts(stack_factory) -> None:
    stack = stack_factory(engines=2, loras=["a", "b"])
    rng = random.Random(8)
    prefix = _text(rng, 500)
    nc = await connect(stack.nats.url, "test")

    async def keys(lora: str | None) -> list[int]:
        reply = await request(nc, "im.tokenize", TokenizeRequest(
            model=MODEL, block_size=BS, prompt=prefix, lora_name=lora, return_token_ids=True),
            TokenizeReply)
        return list(reply.block_keys)

    async def matched(block_keys: list[int]) -> dict[str, int]:
        r = await request(nc, "im.index.lookup", LookupRequest(model=MODEL, block_keys=block_keys),
                          LookupReply)
        return {m.pod: m.blocks for m in r.matches if m.blocks}

    try:
        keys_a, keys_b, keys_base = await keys("a"), await keys("b"), await keys(None)
        assert len(keys_a) > 20
        assert not set(keys_a) & set(keys_base) and not set(keys_a) & set(keys_b)
        async with aiohttp.ClientSession() as http:
            first, _ = await _complete(http, stack, "a", prefix + " first")

            async def indexed() -> bool:
                return (await matched(keys_a)).get(first, 0) >= len(keys_a) - 1

            await wait_until(indexed, what="the adapter's prefix indexed")
            # The blocks are `a`'s: no pod is credited with them for the base model or `b`.
            assert await matched(keys_base) == {} and await matched(keys_b) == {}
            # `a`'s follow-ups go where `a`'s blocks are, and hit them there.
            for i in range(6):
                pod, data = await _complete(http, stack, "a", prefix + f" question {i}")
                assert pod == first
                assert data["usage"]["prompt_tokens_details"]["cached_tokens"] >= \
                    (len(keys_a) - 1) * BS
            # The same text for the base model or `b` hits nothing, wherever it lands.
            for model in (MODEL, "b"):
                _, data = await _complete(http, stack, model, prefix + " question 0")
                assert data["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, model
    finally:
        await nc.close()
