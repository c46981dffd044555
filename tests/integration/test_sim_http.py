"""The simulator's HTTP API against a real `infermesh sim` process: the official openai SDK,
prefix-cache reporting, /tokenize against the tokenization library, bad input (4xx JSON, never a
500, and the server keeps serving), failure injection, LoRA, cache reset, the CPU tier and client
disconnects."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infermesh.libs.tokenization import ModelTokenizer

from .helpers import SIM_BLOCK_SIZE, complete_ids, random_prompt, sim_cache, wait_until

MODEL = "infermesh/tiny-llama"
BS = SIM_BLOCK_SIZE
JSON = {"Content-Type": "application/json"}

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()


def long_text(seed: int, words: int = 300) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def sdk(eng: dict[str, Any]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{eng['http']}/v1", api_key="unused", max_retries=0,
                              timeout=30)


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Every sample of a Prometheus page, keyed by name (labels dropped: summed)."""
    async with http.get(url) as r:
        assert r.status == 200
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


async def rejected(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with http.get(f"{base}/sim/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "infermesh_sim_rejected_requests_total":
                out[s.labels["reason"]] = s.value
    return out


async def post(http: aiohttp.ClientSession, url: str, body: Any = None, *,
               data: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    raw = data if data is not None else json.dumps(body).encode()
    async with http.post(url, data=raw, headers=headers or JSON) as r:
        text = await r.text()
        assert r.content_type == "application/json", (r.status, r.content_type, text[:300])
        return r.status, json.loads(text)


# ---------------------------------------------------------------------- the openai SDK


async def test_openai_sdk_completion_streamed_chat_and_models(procs) -> None:
    _, info = procs.sim("--time-scale", "0.01")
    client = sdk(info["engines"][0])
    async with client:
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]

        c = await client.completions.create(model=MODEL, prompt="Once upon a time",
                                            max_tokens=7)
        assert c.object == "text_completion" and c.model == MODEL
        assert c.choices[0].finish_reason == "length" and c.choices[0].text
        assert c.usage is not None and c.usage.completion_tokens == 7
        assert c.usage.total_tokens == c.usage.prompt_tokens + 7

        messages = [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": long_text(1, 120)}]
        for attempt in range(2):
            stream = await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=9, stream=True,
                stream_options={"include_usage": True})
            chunks = [ch async for ch in stream]
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert text
            assert chunks[0].choices[0].delta.role == "assistant"
            finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
            assert finals[-1] == "length" and set(finals[:-1]) == {None}
            usage = chunks[-1].usage
            assert usage is not None and chunks[-1].choices == []
            assert usage.completion_tokens == 9 and usage.prompt_tokens > 2 * BS
            assert usage.prompt_tokens_details is not None
            cached = usage.prompt_tokens_details.cached_tokens
            if attempt == 0:
                assert cached == 0
            else:  # the same conversation again: every full block but the last token's hits
                assert cached == (usage.prompt_tokens - 1) // BS * BS
            assert all(ch.usage is None for ch in chunks[:-1])


async def test_repeated_long_prompt_is_served_from_the_prefix_cache(procs) -> None:
    _, info = procs.sim("--time-scale", "0.01")
    eng = info["engines"][0]
    prompt = long_text(2, 400)
    async with sdk(eng) as client, aiohttp.ClientSession() as http:
        before = await scrape(http, f"{eng['http']}/metrics")
        first = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
        second = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
        after = await scrape(http, f"{eng['http']}/metrics")
    assert first.usage is not None and second.usage is not None
    n = first.usage.prompt_tokens
    assert n > 10 * BS
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == (n - 1) // BS * BS > 0
    hits = after["vllm:prefix_cache_hits_total"] - before.get("vllm:prefix_cache_hits_total", 0)
    assert hits == cached
    queries = after["vllm:prefix_cache_queries_total"] - before.get(
        "vllm:prefix_cache_queries_total", 0)
    assert queries == 2 * n
    assert after["vllm:request_success_total"] - before.get("vllm:request_success_total", 0) == 2


# ---------------------------------------------------------------------- /tokenize


async def test_tokenize_matches_the_tokenization_library(procs, model_dir) -> None:
    _, info = procs.sim("--time-scale", "0")
    base = info["engines"][0]["http"]
    tok = ModelTokenizer.from_folder(model_dir)
    prompt = "Hello, world! Ünïcödé and emoji 🚀 too.\n" + long_text(3, 40)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "4."},
                {"role": "user", "content": [{"type": "text", "text": "And 3 + 3?"}]}]
    async with aiohttp.ClientSession() as http:
        status, body = await post(http, f"{base}/tokenize", {"model": MODEL, "prompt": prompt})
        assert status == 200 and body["tokens"] == tok.encode(prompt)
        assert body["count"] == len(body["tokens"])
        status, body = await post(http, f"{base}/tokenize",
                                  {"prompt": prompt, "add_special_tokens": False})
        assert status == 200 and body["tokens"] == tok.encode(prompt, add_special_tokens=False)
        status, body = await post(http, f"{base}/tokenize", {"model": MODEL, "messages": messages})
        assert status == 200 and body["tokens"] == tok.encode_chat(messages)
        status, body = await post(http, f"{base}/tokenize",
                                  {"messages": messages, "add_generation_prompt": False})
        assert status == 200
        assert body["tokens"] == tok.encode_chat(messages, add_generation_prompt=False)
        # What /tokenize says is what a completion is billed for.
        n = len(tok.encode(prompt))
        status, body = await post(http, f"{base}/v1/completions",
                                  {"model": MODEL, "prompt": prompt, "max_tokens": 1})
        assert status == 200 and body["usage"]["prompt_tokens"] == n
        # /detokenize inverts it.
        status, body = await post(http, f"{base}/detokenize",
                                  {"tokens": tok.encode(prompt, add_special_tokens=False)})
        assert status == 200 and body["prompt"] == prompt


# ---------------------------------------------------------------------- bad input


def _bad_requests(max_body: int) -> list[tuple[str, str, Any, int]]:
    """(name, path, body (dict → JSON, bytes as is), expected status)."""
    c, ch = "/v1/completions", "/v1/chat/completions"
    return [
        ("invalid json", c, b'{"model": "m", "prompt": ', 400),
        ("not json at all", c, b"hello there", 400),
        ("empty body", c, b"", 400),
        ("top-level array", c, [1, 2, 3], 400),
        ("prompt wrong type", c, {"model": MODEL, "prompt": 5}, 400),
        ("max_tokens wrong type", c, {"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400),
        ("max_tokens float", c, {"model": MODEL, "prompt": "hi", "max_tokens": 1.5}, 400),
        ("temperature wrong type", c, {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400),
        ("negative max_tokens", c, {"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400),
        ("negative chat max_tokens", ch,
         {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400),
        ("messages wrong type", ch, {"model": MODEL, "messages": "hi"}, 400),
        ("message without role", ch, {"model": MODEL, "messages": [{"content": "hi"}]}, 400),
        ("unknown model", c, {"model": "no-such-model", "prompt": "hi"}, 404),
        ("unknown chat model", ch,
         {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404),
        ("token id out of vocabulary", c, {"model": MODEL, "prompt": [1, 2, 10**9]}, 400),
        ("prompt too long", c, {"model": MODEL, "prompt": "word " * 1500, "max_tokens": 1}, 400),
        ("prompt + max_tokens too long", c,
         {"model": MODEL, "prompt": "hi", "max_tokens": 10_000}, 400),
        ("body too large", c, {"model": MODEL, "prompt": "x" * (max_body + 10)}, 413),
        ("non-UTF-8 bytes", c, b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe"}', 400),
        ("deeply nested", c, b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400),
        ("tokenize wrong type", "/tokenize", {"prompt": ["a", 1]}, 400),
        ("detokenize wrong type", "/detokenize", {"tokens": "abc"}, 400),
    ]


async def test_bad_input_gets_4xx_json_and_the_sim_keeps_serving(procs) -> None:
    max_body = 200_000
    _, info = procs.sim("--time-scale", "0.01", "--max-model-len", "1024",
                        "--max-body-bytes", str(max_body))
    base = info["engines"][0]["http"]
    cases = _bad_requests(max_body)
    async with aiohttp.ClientSession() as http:
        for name, path, body, expect in cases:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            status, data = await post(http, base + path, data=raw)
            assert status == expect, (name, status, data)
            if "detail" in data:  # FastAPI's own refusal of bodies it cannot parse
                assert name in ("non-UTF-8 bytes", "deeply nested"), (name, data)
                assert isinstance(data["detail"], str)
            else:
                err = data["error"]
                assert err["code"] == expect and err["message"] and err["type"], (name, data)
        # The right messages where a client depends on them.
        _, data = await post(http, f"{base}/v1/completions",
                             {"model": MODEL, "prompt": "word " * 1500})
        assert "maximum context length is 1024" in data["error"]["message"]
        _, data = await post(http, f"{base}/v1/completions", {"model": "nope", "prompt": "hi"})
        assert data["error"]["type"] == "NotFoundError" and data["error"]["param"] == "model"
        # Wrong content type.
        status, data = await post(http, f"{base}/v1/completions", {"prompt": "hi"},
                                  headers={"Content-Type": "text/plain"})
        assert 400 <= status < 500 and ("error" in data or "detail" in data)

        counted = await rejected(http, base)
        assert sum(counted.values()) == len(cases) + 3, counted
        assert counted.get("too_large") == 1 and "internal" not in counted

        # Still serving: health, a good completion, a good streamed chat.
        async with http.get(f"{base}/health") as r:
            assert r.status == 200
        status, data = await post(http, f"{base}/v1/completions",
                                  {"model": MODEL, "prompt": "still alive?", "max_tokens": 3})
        assert status == 200 and data["usage"]["completion_tokens"] == 3
        cache = await sim_cache(http, base)
        assert cache["used"] == 0 and cache["running"] == 0 and cache["waiting"] == 0


ODD_UNICODE = [
    "\ud800 lone high surrogate",  # legal as a JSON escape, not in UTF-8
    "\udfff lone low surrogate",
    "NUL \u0000 inside",
    "bidi \u202e override \u202c and zero width \u200b\u200d joiners",
    "combining e\u0301\u0301\u0301 and \ufeff BOM and \ufffe noncharacter",
    "astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🧑‍🚀 and CJK 漢字 and RTL שלום",
    "\U0010ffff last code point",
]


async def test_odd_unicode_never_breaks_the_server(procs) -> None:
    _, info = procs.sim("--time-scale", "0")
    base = info["engines"][0]["http"]
    async with aiohttp.ClientSession() as http:
        for text in ODD_UNICODE:
            # json.dumps escapes everything (\\ud800 stays an escape, as a client would send it).
            for path, body in (
                ("/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 2}),
                ("/v1/chat/completions",
                 {"model": MODEL, "messages": [{"role": "user", "content": text}],
                  "max_tokens": 2}),
                ("/tokenize", {"prompt": text}),
            ):
                status, data = await post(http, base + path, body)
                assert status == 200, (text, path, data)
            # Raw UTF-8 (no escapes) where UTF-8 can carry it.
            try:
                raw = json.dumps({"model": MODEL, "prompt": text, "max_tokens": 1},
                                 ensure_ascii=False).encode()
            except UnicodeEncodeError:
                continue
            status, data = await post(http, f"{base}/v1/completions", data=raw)
            assert status == 200, (text, data)
        counted = await rejected(http, base)
        assert "internal" not in counted, counted


# ---------------------------------------------------------------------- failure injection


async def test_failure_injection_returns_the_configured_codes(procs) -> None:
    _, info = procs.sim("--time-scale", "0", "--failure-rate", "1", "--failure-codes", "429,503")
    base = info["engines"][0]["http"]
    seen: dict[int, int] = {}
    async with aiohttp.ClientSession() as http:
        for i in range(20):
            path, body = (("/v1/completions", {"model": MODEL, "prompt": f"try {i}"}) if i % 2
                          else ("/v1/chat/completions",
                                {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                 "stream": True}))
            status, data = await post(http, base + path, body)
            seen[status] = seen.get(status, 0) + 1
            assert data["error"]["code"] == status and data["error"]["message"]
            assert data["error"]["type"] == {429: "RateLimitError",
                                             503: "ServiceUnavailableError"}[status]
        assert set(seen) == {429, 503}, seen
        # Bad input is still refused as bad input, before any injected failure.
        status, _ = await post(http, f"{base}/v1/completions", {"model": "nope", "prompt": "x"})
        assert status == 404
        async with http.get(f"{base}/health") as r:
            assert r.status == 200
        cache = await sim_cache(http, base)
        assert cache["used"] == 0 and cache["GPU"] == []  # nothing reached the engine


# ---------------------------------------------------------------------- LoRA


async def test_lora_adapter_is_listed_and_served(procs) -> None:
    _, info = procs.sim("--time-scale", "0", "--loras", "adapter1")
    eng = info["engines"][0]
    async with sdk(eng) as client, aiohttp.ClientSession() as http:
        models = {m.id: m for m in (await client.models.list()).data}
        assert set(models) == {MODEL, "adapter1"}
        assert models["adapter1"].model_extra["parent"] == MODEL
        prompt = long_text(4, 60)
        c = await client.completions.create(model="adapter1", prompt=prompt, max_tokens=3)
        assert c.model == "adapter1" and c.usage.completion_tokens == 3
        chat = await client.chat.completions.create(
            model="adapter1", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert chat.model == "adapter1" and chat.choices[0].message.content
        # The adapter's blocks are its own: the base model does not hit them, the adapter does.
        base = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
        assert base.usage.prompt_tokens_details.cached_tokens == 0
        again = await client.completions.create(model="adapter1", prompt=prompt, max_tokens=1)
        assert again.usage.prompt_tokens_details.cached_tokens > 0
        metrics = await scrape(http, f"{eng['http']}/metrics")
        assert "vllm:lora_requests_info" in metrics
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="adapter2", prompt="x", max_tokens=1)


# ---------------------------------------------------------------------- cache endpoints


async def test_reset_prefix_cache_empties_the_cache(procs) -> None:
    _, info = procs.sim("--time-scale", "0")
    base = info["engines"][0]["http"]
    rng = random.Random(5)
    async with aiohttp.ClientSession() as http:
        prompt = random_prompt(rng, 6 * BS + 3)
        await complete_ids(http, base, prompt, max_tokens=2)
        assert len((await sim_cache(http, base))["GPU"]) == 6
        async with http.post(f"{base}/reset_prefix_cache") as r:
            assert r.status == 200
        cache = await sim_cache(http, base)
        assert cache["GPU"] == [] and cache["CPU"] == [] and cache["used"] == 0
        # The cache works again afterwards, from scratch.
        data = await complete_ids(http, base, prompt, max_tokens=1)
        assert data["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        data = await complete_ids(http, base, prompt, max_tokens=1)
        assert data["usage"]["prompt_tokens_details"]["cached_tokens"] == 6 * BS


async def test_evicted_blocks_move_to_the_cpu_tier(procs) -> None:
    _, info = procs.sim("--time-scale", "0", "--num-gpu-blocks", "24", "--num-cpu-blocks", "200")
    base = info["engines"][0]["http"]
    rng = random.Random(6)
    prompts = [random_prompt(rng, 5 * BS + 2) for _ in range(8)]  # 40 full blocks > 24
    seen_gpu: set[int] = set()
    async with aiohttp.ClientSession() as http:
        for p in prompts:
            await complete_ids(http, base, p, max_tokens=1)
            seen_gpu.update((await sim_cache(http, base))["GPU"])
        cache = await sim_cache(http, base)
        assert cache["CPU"], "the small GPU cache should have offloaded blocks"
        assert set(cache["CPU"]) <= seen_gpu
        assert not set(cache["CPU"]) & set(cache["GPU"])
        assert len(cache["GPU"]) <= 24 and cache["used"] == 0
        # The first prompt was evicted from GPU: it is found on CPU and loaded back.
        data = await complete_ids(http, base, prompts[0], max_tokens=1)
        assert data["usage"]["prompt_tokens_details"]["cached_tokens"] == 5 * BS


# ---------------------------------------------------------------------- disconnects


async def test_client_disconnect_mid_stream_frees_blocks(procs) -> None:
    # Real time: 2,000 tokens at ~7 ms each would take ~14 s; the client leaves after a few.
    _, info = procs.sim("--time-scale", "1")
    base = info["engines"][0]["http"]
    rng = random.Random(7)
    async with aiohttp.ClientSession() as http:
        for path, body in (
            ("/v1/completions", {"model": MODEL, "prompt": random_prompt(rng, 5 * BS),
                                 "max_tokens": 2000, "stream": True}),
            ("/v1/chat/completions",
             {"model": MODEL, "messages": [{"role": "user", "content": long_text(8, 80)}],
              "max_tokens": 2000, "stream": True, "stream_options": {"include_usage": True}}),
        ):
            async with http.post(base + path, json=body) as r:
                assert r.status == 200
                events = 0
                async for line in r.content:
                    if line.startswith(b"data: "):
                        events += 1
                    if events >= 3:
                        break
                cache = await sim_cache(http, base)
                assert cache["used"] > 0 and cache["running"] == 1
                r.connection.transport.abort()  # drop the TCP connection mid-stream

            async def freed() -> bool:
                c = await sim_cache(http, base)
                return c["used"] == 0 and c["running"] == 0

            await wait_until(freed, timeout=5, what="blocks freed after the disconnect")
        metrics = await scrape(http, f"{base}/metrics")
        assert metrics["vllm:num_requests_running"] == 0


async def test_concurrent_streams_then_disconnects_leave_no_blocks(procs) -> None:
    _, info = procs.sim("--time-scale", "1", "--max-num-seqs", "4")
    base = info["engines"][0]["http"]
    rng = random.Random(9)

    async def one(i: int) -> None:
        body = {"model": MODEL, "prompt": random_prompt(rng, 3 * BS + i), "max_tokens": 2000,
                "stream": True}
        async with aiohttp.ClientSession() as http, http.post(f"{base}/v1/completions",
                                                              json=body) as r:
            assert r.status == 200
            if i % 2:  # leave before the first token (possibly still waiting for a seat)
                return
            async for line in r.content:
                if line.startswith(b"data: "):
                    return

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), 20)
    async with aiohttp.ClientSession() as http:

        async def idle() -> bool:
            c = await sim_cache(http, base)
            return c["used"] == 0 and c["running"] == 0 and c["waiting"] == 0

        await wait_until(idle, timeout=10, what="every request gone")
        data = await complete_ids(http, base, random_prompt(rng, 20), max_tokens=2)
        assert data["usage"]["completion_tokens"] == 2


async def test_client_disconnect_during_a_non_streamed_request_frees_blocks(procs) -> None:
    sim, info = procs.sim("--time-scale", "1")
    base = info["engines"][0]["http"]
    rng = random.Random(10)
    body = {"model": MODEL, "prompt": random_prompt(rng, 4 * BS), "max_tokens": 2000}
    try:
        async with aiohttp.ClientSession() as http:
            with pytest.raises(asyncio.TimeoutError):
                async with http.post(f"{base}/v1/completions", json=body,
                                     timeout=aiohttp.ClientTimeout(total=0.3)) as r:
                    await r.read()

            async def freed() -> bool:
                c = await sim_cache(http, base)
                return c["used"] == 0 and c["running"] == 0

            await wait_until(freed, timeout=3, what="blocks freed after the client gave up")
    finally:
        sim.kill()  # SIGTERM would wait for the orphaned request (see the report)


async def test_stop_string_ends_a_non_streamed_request_early(procs) -> None:
    _, info = procs.sim("--time-scale", "0")
    base = info["engines"][0]["http"]
    async with aiohttp.ClientSession() as http:
        body = {"model": MODEL, "prompt": "hello there", "max_tokens": 500, "stop": ["e"]}
        async with http.post(f"{base}/v1/completions", json=body) as r:
            data = await r.json()
        choice = data["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["stop_reason"] == "e"
        assert "e" not in choice["text"]
        assert data["usage"]["completion_tokens"] < 500
        async with http.get(f"{base}/metrics") as r:
            text = await r.text()
        line = next(x for x in text.splitlines()
                    if x.startswith("vllm:request_success_total") and 'finished_reason="stop"' in x)
        assert float(line.split()[-1]) == 1.0


# ---------------------------------------------------------------------- what peer routers call


async def test_peer_router_endpoints(procs, model_dir) -> None:
    """What sglang-router and vllm-router call on a worker: the render endpoints (one
    engine input per prompt), /tokenize, /server_info, /kv_event_sources (the engine's own
    ZMQ endpoints) and SGLang's info names; a bad render body is vLLM's 400 JSON."""
    _, info = procs.sim("--time-scale", "0", "--block-size", "32")
    eng = info["engines"][0]
    base = eng["http"]
    tok = ModelTokenizer.from_folder(model_dir)
    prompts = [long_text(11, 30), long_text(12, 30)]
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    async with aiohttp.ClientSession() as http:
        status, items = await post(http, f"{base}/v1/completions/render",
                                   {"model": MODEL, "prompt": prompts, "max_tokens": 4})
        assert status == 200 and [i["token_ids"] for i in items] == [tok.encode(p) for p in prompts]
        assert all(i["features"] is None and i["model"] == MODEL for i in items)
        status, item = await post(http, f"{base}/v1/chat/completions/render",
                                  {"model": MODEL, "messages": messages})
        assert status == 200 and item["token_ids"] == tok.encode_chat(messages)
        assert item["request_id"].startswith("chatcmpl-")
        status, err = await post(http, f"{base}/v1/completions/render", {"model": MODEL})
        assert status == 400 and err["error"]["type"] == "BadRequestError"
        assert err["error"]["param"] == "prompt" and err["error"]["code"] == 400
        status, err = await post(http, f"{base}/v1/chat/completions/render",
                                 {"model": "no-such-model", "messages": messages})
        assert status == 404 and err["error"]["type"] == "NotFoundError"
        status, body = await post(http, f"{base}/tokenize", {"prompt": prompts[0]})
        assert status == 200 and list(body) == ["count", "max_model_len", "tokens", "token_strs"]

        async with http.get(f"{base}/server_info", params={"config_format": "json"}) as r:
            config = (await r.json())["vllm_config"]
        assert config["model_config"]["model"] == str(model_dir)
        assert config["cache_config"]["block_size"] == 32
        async with http.get(f"{base}/kv_event_sources") as r:
            sources = await r.json()
        assert sources["0"]["endpoint"] == eng["kv"] and sources["0"]["topic"] == eng["topic"]
        assert sources["0"]["replay_endpoint"] == eng["replay"]
        async with http.get(f"{base}/get_server_info") as r:
            sg = await r.json()
        assert sg["model_id"] == MODEL and sg["kv_block_size"] == 32
        async with http.get(f"{base}/model_info") as r:
            assert (await r.json())["architectures"] == ["LlamaForCausalLM"]
