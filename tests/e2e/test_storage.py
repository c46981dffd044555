"""The shared-storage KV tier through the whole system (`infermesh up --storage-dir`): blocks one
engine computed reach the directory and the index as the pool's, every pod of the pool is
credited with them, and after that engine is gone another serves the prompt from storage, routed
there knowing it."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import nats

from infermesh.proto import codec
from infermesh.proto.messages import (
    TIER_SHARED,
    LookupReply,
    LookupRequest,
    RequestEvent,
    TokenizeReply,
    TokenizeRequest,
)

MODEL = "infermesh/tiny-llama"


def _text(rng: random.Random, words: int) -> str:
    vocab = ("alpha beta gamma delta river stone cloud light north quiet engine market "
             "window garden silver paper").split()
    return " ".join(rng.choice(vocab) for _ in range(words))


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _wait(what: str, check, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    """Poll ``check`` (async, truthy when done) until it holds; fail with ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = await check()
        if got:
            return got
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_storage_blocks_serve_every_pod_of_the_pool(stack_factory, tmp_path) -> None:
    storage = tmp_path / "kv-storage"
    stack = stack_factory(engines=3, storage_dir=str(storage))
    engines = {f"sim-{e['index']}": e["http"] for e in stack.engines}
    rng = random.Random(11)
    prompt = _text(rng, 600)
    nc = await nats.connect(stack.nats.url)
    routed: list[RequestEvent] = []

    async def on_req(msg) -> None:  # type: ignore[no-untyped-def]
        ev = codec.decode(msg.data, RequestEvent)
        if ev.kind == "routed":
            routed.append(ev)

    await nc.subscribe("im.req.*", cb=on_req)
    try:
        async with aiohttp.ClientSession() as http:
            # One engine (a) computes the prompt, routed as usual.
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 4}
            async with http.post(stack.ingress_url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                a = r.headers["x-infermesh-endpoint"]
            others = sorted(set(engines) - {a})
            # The prompt's keys, as the tokenizer computes them for routing.
            ask = TokenizeRequest(model=MODEL, block_size=16, prompt=prompt, return_token_ids=True)
            tok = codec.decode((await nc.request("im.tokenize", codec.encode(ask), timeout=5)
                                ).data, TokenizeReply)
            keys = tok.block_keys
            assert len(keys) >= 8

            async def written() -> bool:  # one file per full block of the prompt
                return len(await _files(storage)) >= len(keys) - 1

            await _wait("block files", written)

            # The index credits every pod of the pool with the storage blocks: the two others
            # never saw the prompt.
            async def credited() -> LookupReply | None:
                reply = codec.decode((await nc.request("im.index.lookup", codec.encode(
                    LookupRequest(model=MODEL, block_keys=keys, pods=list(engines))),
                    timeout=5)).data, LookupReply)
                m = {x.pod: x for x in reply.matches}
                ok = all(m[p].blocks >= len(keys) - 1 and TIER_SHARED in m[p].tiers
                         for p in others)
                return reply if ok else None

            reply = await _wait("the pool's storage blocks in the index", credited)
            by_pod = {x.pod: x for x in reply.matches}
            assert by_pod[a].blocks >= len(keys) - 1  # its own (GPU) blocks
            assert all(t == TIER_SHARED for t in by_pod[others[0]].tiers)

            # a is gone; the prompt goes to another engine, which loads it from storage.
            {p.name: p for p in stack.system.procs("sim")}[a].kill()
            routed.clear()
            async with http.post(stack.ingress_url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                served = r.headers["x-infermesh-endpoint"]
                out = await r.json()
            assert served in others
            cached = out["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached >= (len(keys) - 1) * 16, out["usage"]
            async with http.get(engines[served] + "/metrics") as r:
                m = await r.text()
            assert _metric(m, "vllm:prompt_tokens_cached_by_source_total", source="disk") >= cached
            assert _metric(m, "vllm:prompt_tokens_cached_by_source_total", source="device") == 0
            # The scheduler routed it knowing the pod would find the prefix (in storage).
            # (The dead engine may have been tried first, before its agent said so: the
            # ingress then retried elsewhere. The decision that served it is the one to read.)
            ev = await _wait("the routed event", lambda: _first(
                [e for e in routed if e.pod == served]))
            assert ev.cached_blocks >= len(keys) - 1
    finally:
        await nc.close()


async def _files(storage) -> list:  # type: ignore[no-untyped-def]
    return sorted(storage.rglob("*.kv")) if storage.exists() else []


async def _first(items: list) -> object:
    return items[0] if items else None



async def test_capacity_eviction_reaches_the_index(stack_factory, tmp_path) -> None:
    """A bounded directory: a second prompt's files push the first prompt's oldest out; the
    engine announces the removals and the index stops crediting the pool with them."""
    storage = tmp_path / "kv-storage"
    # ≈ 4.1 KB a file (the simulator's 4 KiB payload and the header): room for ≈ 100 blocks.
    stack = stack_factory(engines=2, storage_dir=str(storage), storage_capacity_bytes=420_000)
    rng = random.Random(12)
    first, second = _text(rng, 600), _text(rng, 600)
    nc = await nats.connect(stack.nats.url)
    try:
        async with aiohttp.ClientSession() as http:

            async def keys_of(prompt: str) -> list[int]:
                ask = TokenizeRequest(model=MODEL, block_size=16, prompt=prompt,
                                      return_token_ids=True)
                return codec.decode((await nc.request("im.tokenize", codec.encode(ask),
                                                      timeout=5)).data, TokenizeReply).block_keys

            k1, k2 = await keys_of(first), await keys_of(second)
            assert len(k1) >= 60 and len(k2) >= 60
            body = {"model": MODEL, "prompt": first, "max_tokens": 2}
            async with http.post(stack.ingress_url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()

            async def stored(keys: list[int], at_least: int):  # type: ignore[no-untyped-def]
                return await _storage_run(nc, stack.pods, keys) >= at_least

            await _wait("the first prompt in the pool's storage",
                        lambda: stored(k1, len(k1) - 1))
            body = {"model": MODEL, "prompt": second, "max_tokens": 2}
            async with http.post(stack.ingress_url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
            await _wait("the second prompt in the pool's storage",
                        lambda: stored(k2, len(k2) - 1))

            async def evicted() -> bool:
                return await _storage_run(nc, stack.pods, k1) < len(k1) // 2

            await _wait("the first prompt's evicted blocks out of the index", evicted)
            files = await _files(storage)
            assert len(files) <= 101  # under the bound again
    finally:
        await nc.close()


async def _storage_run(nc, pods: list[str], keys: list[int]) -> int:  # type: ignore[no-untyped-def]
    """The longest run of ``keys`` any pod gets from the pool's shared storage."""
    reply = codec.decode((await nc.request("im.index.lookup", codec.encode(
        LookupRequest(model=MODEL, block_keys=keys, pods=pods)), timeout=5)).data, LookupReply)
    return max((m.tiers.count(TIER_SHARED) for m in reply.matches), default=0)
