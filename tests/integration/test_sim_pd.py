"""Prefill/decode disaggregation on real `infermesh sim` processes, by hand over HTTP, the way
vLLM's NIXL connector is driven by a router: the prefill engine gets the request with
``max_tokens: 1`` and ``do_remote_decode``, answers ``kv_transfer_params``; the decode engine
gets the original request with that dict, reads the blocks from the prefill engine and
generates. Also: the lease running out frees the prefill's blocks, a killed prefill engine
fails the decode as vLLM's "fail" policy does, and an engine without a connector ignores
the params."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .helpers import SIM_BLOCK_SIZE, sim_cache, wait_until

BS = SIM_BLOCK_SIZE
JSON = {"Content-Type": "application/json"}
KV_BYTES_PER_TOKEN = 131_072
BANDWIDTH = 2e8  # slow enough that the modelled read shows in the TTFT
PROMPT = " ".join(["the quick brown fox jumps over the lazy dog"] * 30)
TO_PREFILL = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
              "remote_block_ids": None, "remote_host": None, "remote_port": None}
GENERATION_ERROR = {"error": {"message": "Internal server error",
                              "type": "InternalServerError", "param": None, "code": 500}}


async def metrics(http: aiohttp.ClientSession, base: str) -> dict[tuple[str, str], float]:
    """Every sample of an engine's /metrics: (name, the non-engine label values) → value."""
    async with http.get(f"{base}/metrics") as r:
        text = await r.text()
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            extra = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())
                             if k not in ("model_name", "engine"))
            out[(s.name, extra)] = out.get((s.name, extra), 0.0) + s.value
    return out


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(url, data=json.dumps(body), headers=JSON) as r:
        return r.status, await r.json(content_type=None)


async def stream(http: aiohttp.ClientSession, url: str, body: Any
                 ) -> tuple[int, list[Any], float]:
    """(status, the SSE events (``[DONE]`` as a string), seconds to the first content)."""
    t0 = time.monotonic()
    first = 0.0
    events: list[Any] = []
    async with http.post(url, data=json.dumps(body), headers=JSON) as r:
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip().decode()
            ev: Any = data if data == "[DONE]" else json.loads(data)
            if not first and isinstance(ev, dict) and _content(ev):
                first = time.monotonic() - t0
            events.append(ev)
        return r.status, events, first


def _growth(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]
            ) -> Any:
    """``grew(name, labels)``: how much a sample grew between two scrapes."""
    def grew(name: str, labels: str = "") -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)
    return grew


def _content(ev: dict[str, Any]) -> str:
    out = ""
    for c in ev.get("choices") or []:
        out += c.get("text") or (c.get("delta") or {}).get("content") or ""
    return out


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def prefill(http: aiohttp.ClientSession, base: str, chat: bool,
                  prompt: str = PROMPT) -> dict[str, Any]:
    """The router's request to the prefill engine; its answer's kv_transfer_params."""
    if chat:
        body: dict[str, Any] = {"messages": messages(prompt), "max_completion_tokens": 1}
        path = "/v1/chat/completions"
    else:
        body = {"prompt": prompt, "max_tokens": 1}
        path = "/v1/completions"
    status, out = await post(http, base + path, {**body, "stream": False,
                                                 "kv_transfer_params": TO_PREFILL})
    assert status == 200, out
    params = out["kv_transfer_params"]
    assert params is not None
    return {"params": params, "prompt_tokens": out["usage"]["prompt_tokens"]}


def decode_body(chat: bool, params: dict[str, Any], streamed: bool,
                prompt: str = PROMPT) -> tuple[str, dict[str, Any]]:
    """The original request, for the decode engine, with the prefill's params verbatim."""
    body: dict[str, Any] = {"max_tokens": 8, "stream": streamed, "kv_transfer_params": params}
    if streamed:
        body["stream_options"] = {"include_usage": True}
    if chat:
        return "/v1/chat/completions", {"messages": messages(prompt), **body}
    return "/v1/completions", {"prompt": prompt, **body}


async def test_prefill_then_decode_streamed_and_not_completions_and_chat(procs) -> None:
    _, info = procs.sim("--kv-connector", "--time-scale", "1",
                        "--kv-transfer-bytes-per-s", str(BANDWIDTH), engines=2)
    p_base, d_base = info["engines"][0]["http"], info["engines"][1]["http"]
    port = int(p_base.rsplit(":", 1)[1])
    async with aiohttp.ClientSession() as http:
        read_tokens = 0
        for chat in (False, True):
            for streamed in (False, True):
                # a prompt of its own each time, so the decode engine reads all of it
                prompt = f"{chat} {streamed} {PROMPT}"
                got = await prefill(http, p_base, chat, prompt)
                params, n = got["params"], got["prompt_tokens"]
                # vLLM's answer, key for key
                assert list(params) == [
                    "do_remote_prefill", "do_remote_decode", "remote_block_ids",
                    "remote_engine_id", "remote_request_id", "remote_host", "remote_port",
                    "tp_size", "dcp_size", "pp_size", "remote_num_tokens",
                    "remote_blocks_expiry_time", "transfer_mode",
                    "remote_prefill_cached_tokens"]
                assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
                assert params["remote_port"] == port and params["transfer_mode"] == "pull"
                assert params["remote_num_tokens"] == n
                assert len(params["remote_block_ids"]) == 1
                assert len(params["remote_block_ids"][0]) == -(-n // BS)
                assert (await sim_cache(http, p_base))["leased"] == 1

                path, body = decode_body(chat, params, streamed, prompt)
                before = await metrics(http, d_base)
                if streamed:
                    status, events, ttft = await stream(http, d_base + path, body)
                    assert status == 200 and events[-1] == "[DONE]"
                    assert "".join(_content(e) for e in events if isinstance(e, dict))
                    usage = events[-2]["usage"]
                else:
                    t0 = time.monotonic()
                    status, out = await post(http, d_base + path, body)
                    ttft = time.monotonic() - t0
                    assert status == 200, out
                    text = (out["choices"][0]["message"]["content"] if chat
                            else out["choices"][0]["text"])
                    assert text and out["choices"][0]["finish_reason"] == "length"
                    assert out["kv_transfer_params"] is None  # only a prefill answers them
                    usage = out["usage"]
                assert usage["prompt_tokens"] == n and usage["completion_tokens"] == 8
                # the decode reports the prefill engine's own hits
                assert usage["prompt_tokens_details"]["cached_tokens"] == \
                    params["remote_prefill_cached_tokens"]
                # the blocks were read and released on the prefill engine
                assert (await sim_cache(http, p_base))["leased"] == 0
                transfer = -(-n // BS) * BS * KV_BYTES_PER_TOKEN / BANDWIDTH
                assert ttft >= transfer, (ttft, transfer)
                after = await metrics(http, d_base)
                grew = _growth(before, after)
                assert grew("vllm:prompt_tokens_by_source_total", "source=local_cache_hit") == 0
                assert grew("vllm:prompt_tokens_by_source_total",
                            "source=external_kv_transfer") == n
                assert grew("vllm:prompt_tokens_by_source_total", "source=local_compute") == 0
                assert grew("vllm:prompt_tokens_cached_by_source_total", "source=p2p") == n
                assert grew("vllm:external_prefix_cache_queries_total") == n
                assert grew("vllm:external_prefix_cache_hits_total") == n
                assert grew("vllm:nixl_xfer_time_seconds_count") == 1
                assert abs(grew("vllm:nixl_xfer_time_seconds_sum") - transfer) < 1e-6
                assert grew("vllm:nixl_bytes_transferred_sum") == \
                    -(-n // BS) * BS * KV_BYTES_PER_TOKEN
                assert grew("vllm:time_to_first_token_seconds_sum") >= transfer
                read_tokens += n
        # the decode engine caches what it read (BlockStored, as vLLM for loaded blocks)
        d_cache = await sim_cache(http, d_base)
        assert len(d_cache["GPU"]) >= 4 * ((n - 1) // BS)
        assert d_cache["used"] == 0 and d_cache["fetching"] == 0
        final = await metrics(http, d_base)
        assert final[("vllm:nixl_num_failed_transfers_total", "")] == 0
        assert final[("vllm:num_requests_kv_fetch_by_stage", "stage=in_progress")] == 0
        assert read_tokens > 0

        # Garbage is refused as vLLM refuses it, or computed locally, never a crash.
        status, out = await post(http, d_base + "/v1/completions",
                                 {"prompt": "hi", "kv_transfer_params": "nope"})
        assert status == 400 and out["error"]["param"] == "body.kv_transfer_params"
        status, out = await post(http, d_base + "/v1/completions",
                                 {"prompt": PROMPT, "max_tokens": 2,
                                  "kv_transfer_params": {"do_remote_prefill": True}})
        assert status == 200 and out["choices"][0]["text"]  # missing keys: computed locally
        bad = {**params, "remote_port": "eighty", "remote_request_id": "x"}
        status, out = await post(http, d_base + "/v1/completions",
                                 {"prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": bad})
        assert (status, out) == (500, GENERATION_ERROR)
        # A decode refused before it reaches the engine frees the prefill's blocks (vLLM
        # notifies the connector of a rejected request).
        got = await prefill(http, p_base, False, "refused " + PROMPT)
        status, out = await post(http, d_base + "/v1/completions",
                                 {"prompt": [1, 2, 10**9], "max_tokens": 4,
                                  "kv_transfer_params": got["params"]})
        assert status == 400 and "out of vocabulary" in out["error"]["message"], out

        async def released() -> bool:
            return (await sim_cache(http, p_base))["leased"] == 0

        await wait_until(released, timeout=10, what="the refused decode to free the blocks")
        async with http.get(f"{d_base}/sim/metrics") as r:
            sim_text = await r.text()
        assert 'infermesh_sim_kv_transfer_params_total{outcome="incomplete"} 1.0' in sim_text
        assert 'infermesh_sim_kv_transfer_params_total{outcome="unusable"} 1.0' in sim_text
        assert 'infermesh_sim_kv_transfer_params_total{outcome="remote_prefill"} 5.0' in sim_text
        async with http.get(f"{d_base}/health") as r:
            assert r.status == 200


async def test_lease_expiry_frees_blocks_and_a_killed_prefill_fails_the_decode(procs) -> None:
    p_proc, p_info = procs.sim("--kv-connector", "--time-scale", "0.01", "--kv-lease-s", "0.5")
    _, d_info = procs.sim("--kv-connector", "--time-scale", "0.01", "--kv-lease-s", "0.5")
    p_base, d_base = p_info["engines"][0]["http"], d_info["engines"][0]["http"]
    async with aiohttp.ClientSession() as http:
        # The decode never comes: the lease runs out and the blocks are freed.
        got = await prefill(http, p_base, chat=False)
        assert (await sim_cache(http, p_base))["used"] > 0  # held, counted in KV usage

        async def expired() -> bool:
            c = await sim_cache(http, p_base)
            return c["leased"] == 0 and c["used"] == 0

        await wait_until(expired, timeout=10, what="the lease to run out")
        m = await metrics(http, p_base)
        assert m[("vllm:nixl_num_kv_expired_reqs_total", "")] == 1
        assert m[("vllm:kv_cache_usage_perc", "")] == 0
        # A late decode reads anyway, as vLLM's pull does; only the prefill engine notices.
        path, body = decode_body(False, got["params"], streamed=False)
        status, out = await post(http, d_base + path, body)
        assert status == 200, out
        m = await metrics(http, p_base)
        assert m[("vllm:nixl_num_notifications_after_expiry_total", "")] == 1

        # The prefill engine dies between its answer and the decode's read.
        fresh = [await prefill(http, p_base, chat) for chat in (False, True)]
        p_proc.kill()
        p_proc.wait(10)
        path, body = decode_body(False, fresh[0]["params"], streamed=False)
        status, out = await post(http, d_base + path, body)
        assert (status, out) == (500, GENERATION_ERROR)
        path, body = decode_body(True, fresh[1]["params"], streamed=True)
        status, events, _ = await stream(http, d_base + path, body)
        assert status == 200
        assert events[-1] == "[DONE]" and events[-2] == GENERATION_ERROR
        assert not any("usage" in e for e in events if isinstance(e, dict))
        m = await metrics(http, d_base)
        assert m[("vllm:nixl_num_failed_transfers_total", "")] == 2
        assert m[("vllm:request_success_total", "finished_reason=error")] == 2
        c = await sim_cache(http, d_base)
        assert c["used"] == 0 and c["fetching"] == 0 and c["running"] == 0


async def test_without_a_connector_the_params_are_ignored(procs) -> None:
    _, info = procs.sim("--time-scale", "0.01")
    base = info["engines"][0]["http"]
    async with aiohttp.ClientSession() as http:
        status, out = await post(http, base + "/v1/completions",
                                 {"prompt": PROMPT, "max_tokens": 1,
                                  "kv_transfer_params": TO_PREFILL})
        assert status == 200 and out["kv_transfer_params"] is None
        c = await sim_cache(http, base)
        assert c["leased"] == 0 and c["used"] == 0
        remote = {"do_remote_prefill": True, "remote_block_ids": [[1, 2]],
                  "remote_engine_id": "e", "remote_request_id": "r",
                  "remote_host": "127.0.0.1", "remote_port": 9}
        status, out = await post(http, base + "/v1/completions",
                                 {"prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": remote})
        assert status == 200 and out["choices"][0]["text"]
        m = await metrics(http, base)
        assert m[("vllm:prompt_tokens_by_source_total", "source=external_kv_transfer")] == 0
        assert not any(name.startswith("vllm:nixl_") for name, _ in m)
        async with http.post(f"{base}/sim/kv_transfer/r", data=b"{}") as r:
            assert r.status == 404
