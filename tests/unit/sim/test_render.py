"""The endpoints peer routers call on a worker, against vLLM 0.32 (EngineApp in-process).

``vllm_render_recordings.json`` holds a live vLLM 0.32.0 server's answers (written by
``gen_vllm_render_recordings.py``: the repo's tiny model served as ``infermesh/tiny-llama``,
``--max-model-len 2048``, ``--enable-scale-out``) on ``/v1/completions/render``,
``/v1/chat/completions/render``, ``/tokenize`` and ``/server_info``'s query check; every
one is replayed on the simulator and must come back byte for byte. The info endpoints
(``/server_info``, ``/kv_event_sources`` and SGLang's names) are checked for the shapes and
fields vLLM and the peer routers (sglang-router 0.3.2, vllm-router 0.1.17) use.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import zmq.asyncio
from aiohttp.test_utils import TestServer

from infermesh.libs.tokenization import ModelTokenizer
from infermesh.services.sim.app import SCALE_OUT_DISABLED, EngineApp
from infermesh.services.sim.config import SimConfig
from infermesh.services.sim.engine import SimEngine
from infermesh.services.sim.metrics import EngineMetrics, vllm_cache_config_labels
from infermesh.services.sim.publisher import ZmqKVPublisher

MODEL = "infermesh/tiny-llama"
RECORDINGS = json.loads(Path(__file__).with_name("vllm_render_recordings.json").read_text())
CASES = RECORDINGS["cases"]

Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve(model_dir: Path) -> AsyncIterator[Serve]:
    """Start one engine's HTTP front (configured as the recorded vLLM unless told);
    returns its base URL. ``publish=True`` gives it a real ZMQ KV-event publisher."""
    started: list[tuple[TestServer, SimEngine]] = []
    ctx = zmq.asyncio.Context()

    async def start(publish: bool = False, **kw: Any) -> str:
        cfg = SimConfig(**{"time_scale": 0, "kv_events": publish, "max_model_len": 2048,
                           "block_size": 32, "num_gpu_blocks": 65, **kw})
        tok = ModelTokenizer.from_folder(model_dir, max_model_len=cfg.max_model_len)
        labels = vllm_cache_config_labels(block_size=cfg.block_size,
                                          num_gpu_blocks=cfg.num_gpu_blocks)
        metrics = EngineMetrics(MODEL, 0, labels, max_model_len=cfg.max_model_len)
        publisher = ZmqKVPublisher(ctx, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*",
                                   topic="kv@test", bind=True) if publish else None
        engine = SimEngine(cfg, 0, MODEL, list(range(100, 600)), None, metrics, publisher)
        engine.start()
        server = SimpleNamespace(cfg=cfg, tokenizer=tok, served_model_name=MODEL,
                                 model_dir=model_dir)
        test_server = TestServer(EngineApp(server, engine, metrics).app())  # type: ignore[arg-type]
        await test_server.start_server()
        started.append((test_server, engine))
        return str(test_server.make_url("")).rstrip("/")

    yield start
    for test_server, engine in started:
        await test_server.close()
        await engine.stop()
    ctx.term()


async def _send(base: str, method: str, path: str, *, body: Any = None, raw: bytes | None = None,
                request_id: str | None = None) -> tuple[int, str, str]:
    headers = {"Content-Type": "application/json"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http, http.request(
            method, base + path, data=data, headers=headers) as r:
        return r.status, r.content_type, await r.text()


def _case_id(case: dict[str, Any]) -> str:
    shown = case["raw_body"] if case["body"] is None else json.dumps(case["body"])
    return f"{case['path']} {str(shown)[:60]}"


def test_recordings_come_from_vllm_0_32() -> None:
    assert RECORDINGS["vllm_version"] == "0.32.0"
    paths = {c["path"] for c in CASES}
    assert {"/v1/completions/render", "/v1/chat/completions/render", "/tokenize"} <= paths
    assert {c["status"] for c in CASES} >= {200, 400, 404}


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
async def test_answers_match_vllm(serve: Serve, case: dict[str, Any]) -> None:
    base = await serve()
    raw = None if case["raw_body"] is None else case["raw_body"].encode()
    status, ctype, text = await _send(base, case["method"], case["path"], body=case["body"],
                                      raw=raw, request_id=case["request_id"])
    assert ctype == "application/json"
    assert (status, text) == (case["status"], case["response"])


async def test_render_gives_each_prompts_own_tokens(serve: Serve, model_dir: Path) -> None:
    # What vllm-router's cache_aware policy reads: one entry per prompt, token_ids, no features.
    base = await serve()
    tok = ModelTokenizer.from_folder(model_dir)
    prompts = ["The quick brown fox", "jumps over the lazy dog"]
    status, _, text = await _send(base, "POST", "/v1/completions/render",
                                  body={"model": MODEL, "prompt": prompts, "max_tokens": 8})
    assert status == 200
    items = json.loads(text)
    assert [i["token_ids"] for i in items] == [tok.encode(p) for p in prompts]
    assert all(i["features"] is None and i["sampling_params"]["max_tokens"] == 8 for i in items)
    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    status, _, text = await _send(base, "POST", "/v1/chat/completions/render", body=chat)
    assert status == 200
    assert json.loads(text)["token_ids"] == tok.encode_chat(chat["messages"])


async def test_render_without_scale_out_is_refused_as_stock_vllm(serve: Serve) -> None:
    base = await serve(enable_scale_out=False)
    for path, body in (("/v1/completions/render", {"prompt": "hi"}),
                       ("/v1/chat/completions/render", {"messages": []})):
        status, _, text = await _send(base, "POST", path, body=body)
        assert status == 403
        assert json.loads(text) == {"error": {"message": SCALE_OUT_DISABLED,
                                              "type": "PermissionDeniedError", "param": None,
                                              "code": 403}}


async def test_server_info_text_and_json(serve: Serve, model_dir: Path) -> None:
    base = await serve(publish=True, max_num_seqs=16)
    status, _, text = await _send(base, "GET", "/server_info")
    assert status == 200
    info = json.loads(text)
    assert list(info) == ["vllm_config", "vllm_env", "system_env"]
    assert info["vllm_config"].startswith(f"model='{model_dir}', speculative_config=None, ")
    assert "served_model_name=infermesh/tiny-llama, enable_prefix_caching=True" in \
        info["vllm_config"]
    assert info["system_env"]["vllm_version"] == "0.32.0"

    status, _, text = await _send(base, "GET", "/server_info?config_format=json")
    assert status == 200
    config = json.loads(text)["vllm_config"]
    # What vllm-router's P/D discovery reads, and values a 0.32 server reported as recorded.
    assert config["model_config"]["model"] == str(model_dir)
    assert config["model_config"]["served_model_name"] == MODEL
    assert config["model_config"]["dtype"] == "torch.bfloat16"
    cache = config["cache_config"]
    assert (cache["block_size"], cache["num_gpu_blocks"], cache["kv_cache_size_tokens"],
            cache["kv_cache_max_concurrency"]) == (32, 65, 2080, 1.015625)
    assert config["scheduler_config"]["max_num_seqs"] == 16
    assert config["kv_events_config"]["topic"] == "kv@test"
    assert config["instance_id"].isdigit()

    status, _, _ = await _send(base, "POST", "/server_info")
    assert status == 405


async def test_kv_event_sources(serve: Serve) -> None:
    base = await serve(publish=True)
    status, _, text = await _send(base, "GET", "/kv_event_sources")
    assert status == 200
    sources = json.loads(text)
    assert list(sources) == ["0"]
    entry = sources["0"]
    assert list(entry) == ["enable_kv_cache_events", "publisher", "endpoint", "replay_endpoint",
                           "buffer_steps", "hwm", "max_queue_size", "topic"]
    assert entry["publisher"] == "zmq" and entry["enable_kv_cache_events"] is True
    assert entry["endpoint"].startswith("tcp://127.0.0.1:")
    assert entry["replay_endpoint"].startswith("tcp://127.0.0.1:")
    assert (entry["buffer_steps"], entry["hwm"], entry["topic"]) == (10_000, 100_000, "kv@test")

    quiet = await serve()
    assert await _send(quiet, "GET", "/kv_event_sources") == (200, "application/json", "{}")


async def test_sglang_named_info_endpoints(serve: Serve, model_dir: Path) -> None:
    base = await serve()
    status, _, text = await _send(base, "GET", "/get_server_info")
    assert status == 200
    info = json.loads(text)
    # sglang-router: served_model_name / model_path labels, dp_size; vllm-router: model_id,
    # kv_block_size. Each router's struct refuses an alias given twice.
    assert info["served_model_name"] == info["model_id"] == MODEL
    assert info["model_path"] == str(model_dir)
    assert (info["kv_block_size"], info["dp_size"], info["tp_size"]) == (32, 1, 1)
    assert "model" not in info and "block_size" not in info
    for path in ("/model_info", "/get_model_info"):
        status, _, text = await _send(base, "GET", path)
        assert status == 200
        assert json.loads(text) == {
            "model_path": str(model_dir), "tokenizer_path": str(model_dir),
            "is_generation": True, "preferred_sampling_params": None,
            "weight_version": "default", "model_type": "llama",
            "architectures": ["LlamaForCausalLM"]}

    stock = await serve(sglang_info=False)
    for path in ("/get_server_info", "/model_info", "/get_model_info"):
        status, _, _ = await _send(stock, "GET", path)
        assert status == 404
