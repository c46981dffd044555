"""The simulator's LoRA adapters as vLLM 0.32 keeps them: runtime load/unload with vLLM's
answers, the filesystem resolver (on demand), residency in max_loras slots with LRU swap, and
``vllm:lora_requests_info`` following the running and waiting adapters."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from infermesh.libs.tinymodel.lora import build_adapter
from infermesh.libs.tokenization import ModelTokenizer
from infermesh.services.sim.app import EngineApp
from infermesh.services.sim.config import SimConfig
from infermesh.services.sim.engine import SimEngine, SimRequest
from infermesh.services.sim.errors import RequestError
from infermesh.services.sim.lora import LoraRegistry
from infermesh.services.sim.metrics import EngineMetrics, vllm_cache_config_labels

MODEL = "tiny"


# ------------------------------------------------------------------ the registry


def test_load_and_unload_answer_as_vllm(tmp_path: Path) -> None:
    reg = LoraRegistry({"a": "/loras/a"}, max_loras=2, runtime_updating=True)
    assert reg.load("b", str(tmp_path)) == "Success: LoRA adapter 'b' added successfully."
    assert reg.paths == {"a": "/loras/a", "b": str(tmp_path)}
    assert reg.ids == {"a": 1, "b": 2}
    with pytest.raises(RequestError) as e:
        reg.load("a", str(tmp_path))
    assert (e.value.status, e.value.type) == (400, "InvalidUserInput")
    assert "has already been loaded" in e.value.message
    with pytest.raises(RequestError) as e:
        reg.load("q", "/nonexistent")
    assert (e.value.status, e.value.message) == (
        404, "Loading lora q failed: No adapter found for /nonexistent")
    with pytest.raises(RequestError) as e:
        reg.load("tiny", str(tmp_path), base="tiny")
    assert e.value.status == 400 and "conflicts with a served base model" in e.value.message
    assert reg.unload("a") == "Success: LoRA adapter 'a' removed successfully."
    with pytest.raises(RequestError) as e:
        reg.unload("a")
    assert (e.value.status, e.value.message) == (404, "The lora adapter 'a' cannot be found.")
    # in place: same id, new path
    reg.load("b", "/loras/b2", inplace=True)
    assert reg.paths["b"] == "/loras/b2" and reg.ids["b"] == 2


def test_resolver_loads_adapters_of_the_lora_dir_on_demand(tmp_path: Path, model_dir: Path) -> None:
    root = tmp_path / "loras"
    build_adapter(root / "x", "x", model_dir)
    build_adapter(root / "other-base", "other-base", model_dir, base_model="/elsewhere")
    off = LoraRegistry({}, max_loras=2, lora_dir=str(root), base_model=str(model_dir))
    assert not off.resolve("x")  # vLLM resolves only with runtime updating on
    reg = LoraRegistry({}, max_loras=2, lora_dir=str(root), base_model=str(model_dir),
                       runtime_updating=True)
    assert reg.servable_on_demand() == ["other-base", "x"]
    assert reg.paths == {}
    assert reg.resolve("x") and reg.paths == {"x": str(root / "x")}
    assert not reg.resolve("other-base")  # another base model's adapter
    assert not reg.resolve("missing") and not reg.resolve("../x")


def test_slots_swap_the_least_recently_used_idle_adapter() -> None:
    reg = LoraRegistry({n: f"/loras/{n}" for n in "abc"}, max_loras=2)
    assert reg.activate("a", set()) and reg.activate("b", set())
    assert not reg.activate("a", set())  # resident: no load; a is now the most recent
    assert list(reg.resident) == ["b", "a"]
    assert reg.can_run("c", {"a"})
    assert reg.activate("c", {"a"})  # b was the least recently used idle one
    assert list(reg.resident) == ["a", "c"]
    assert not reg.can_run("b", {"a", "c"})  # every slot busy: wait
    assert reg.can_run("a", {"a", "c"})
    assert reg.swaps == 3


# ------------------------------------------------------------------ the engine


def _engine(**kw: Any) -> SimEngine:
    cfg = SimConfig(**{"time_scale": 0, "kv_events": False, **kw})
    labels = vllm_cache_config_labels(block_size=cfg.block_size, num_gpu_blocks=cfg.num_gpu_blocks)
    metrics = EngineMetrics(MODEL, 0, labels, max_model_len=cfg.max_model_len,
                            enable_lora=cfg.lora_enabled())
    return SimEngine(cfg, 0, MODEL, list(range(100, 600)), None, metrics, None)


def _req(rid: str, lora: str | None) -> SimRequest:
    return SimRequest(request_id=rid, prompt_ids=list(range(1000, 1040)), max_tokens=50,
                      lora_name=lora)


def _lora_info(engine: SimEngine) -> tuple[str, str]:
    """(running, waiting) of the newest ``vllm:lora_requests_info`` series."""
    newest = max((s for m in engine.metrics.registry.collect()
                  if m.name == "vllm:lora_requests_info" for s in m.samples),
                 key=lambda s: s.value)
    return newest.labels["running_lora_adapters"], newest.labels["waiting_lora_adapters"]


def test_request_for_an_adapter_without_a_slot_waits_and_later_ones_go_first() -> None:
    # The engine loop is not started: admission runs by hand, so the order is exact.
    engine = _engine(loras=["a", "b"], max_loras=1)
    ra, rb, base = _req("ra", "a"), _req("rb", "b"), _req("base", None)
    for r in (ra, rb, base):
        engine.submit(r)
    engine._admit(time.monotonic())
    assert engine.running == [ra, base]  # b's slot is held by running a: skipped, not blocking
    assert list(engine.waiting) == [rb]
    assert list(engine.lora.resident) == ["a"]
    engine._update_gauges()
    assert _lora_info(engine) == ("a", "b")
    # a finishes: b swaps a out
    engine._finish(ra, "length")
    engine._admit(time.monotonic())
    assert rb in engine.running and list(engine.lora.resident) == ["b"]
    assert engine.lora.swaps == 2
    engine._update_gauges()
    assert _lora_info(engine) == ("b", "")


def test_unloaded_adapter_keeps_its_running_request_and_refuses_new_ones() -> None:
    engine = _engine(loras=["a"], runtime_lora_updating=True)
    ra = _req("ra", "a")
    engine.submit(ra)
    engine._admit(time.monotonic())
    engine.lora.unload("a")
    assert ra.lora_path == "/loras/a"  # its blocks keep hashing with the adapter it came with
    assert engine.prompt_hashes(ra) != engine.prompt_hashes(_req("base", None))
    with pytest.raises(ValueError, match="unknown LoRA adapter"):
        engine.submit(_req("rb", "a"))


# ------------------------------------------------------------------ HTTP


@pytest.fixture
async def lora_app(model_dir: Path, tmp_path: Path) -> AsyncIterator[str]:
    """One engine with adapter ``a`` at start, runtime updating on, and a LoRA directory
    holding adapter ``od`` for the tiny model."""
    root = tmp_path / "loras"
    build_adapter(root / "od", "od", model_dir)
    build_adapter(root / "b", "b", model_dir)
    cfg = SimConfig(time_scale=0, kv_events=False, loras=["a"], runtime_lora_updating=True,
                    lora_dir=str(root))
    tok = ModelTokenizer.from_folder(model_dir, max_model_len=cfg.max_model_len)
    labels = vllm_cache_config_labels(block_size=cfg.block_size, num_gpu_blocks=cfg.num_gpu_blocks)
    metrics = EngineMetrics(MODEL, 0, labels, max_model_len=cfg.max_model_len, enable_lora=True)
    engine = SimEngine(cfg, 0, MODEL, list(range(100, 600)), None, metrics, None,
                       model_path=str(model_dir))
    engine.start()
    server = SimpleNamespace(cfg=cfg, tokenizer=tok, served_model_name=MODEL, model_dir=model_dir)
    test_server = TestServer(EngineApp(server, engine, metrics).app())  # type: ignore[arg-type]
    await test_server.start_server()
    try:
        yield str(test_server.make_url("")).rstrip("/")
    finally:
        await test_server.close()
        await engine.stop()


async def _models(http: aiohttp.ClientSession, base: str) -> dict[str, str | None]:
    async with http.get(f"{base}/v1/models") as r:
        return {c["id"]: c["parent"] for c in (await r.json())["data"]}


async def _post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, str]:
    async with http.post(url, data=json.dumps(body),
                         headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.text()


async def test_runtime_load_unload_and_on_demand_over_http(lora_app: str, tmp_path: Path) -> None:
    base = lora_app
    async with aiohttp.ClientSession() as http:
        assert await _models(http, base) == {MODEL: None, "a": MODEL}
        status, text = await _post(http, f"{base}/v1/load_lora_adapter",
                                   {"lora_name": "b", "lora_path": str(tmp_path / "loras" / "b")})
        assert (status, text) == (200, "Success: LoRA adapter 'b' added successfully.")
        assert await _models(http, base) == {MODEL: None, "a": MODEL, "b": MODEL}
        status, text = await _post(http, f"{base}/v1/load_lora_adapter",
                                   {"lora_name": "b", "lora_path": "/x"})
        assert status == 400 and json.loads(text)["error"]["type"] == "InvalidUserInput"
        status, text = await _post(http, f"{base}/v1/unload_lora_adapter", {"lora_name": "a"})
        assert (status, text) == (200, "Success: LoRA adapter 'a' removed successfully.")
        status, text = await _post(http, f"{base}/v1/unload_lora_adapter", {"lora_name": "a"})
        assert status == 404 and json.loads(text)["error"] == {
            "message": "The lora adapter 'a' cannot be found.", "type": "NotFoundError",
            "param": None, "code": 404}
        # a request naming an unloaded adapter: 404 naming the base model, as vLLM
        status, text = await _post(http, f"{base}/v1/completions",
                                   {"model": "a", "prompt": "hi", "max_tokens": 1})
        assert status == 404
        assert json.loads(text)["error"]["message"] == (
            f"The model `a` does not exist. Valid aliases: {MODEL}.")
        # one in the LoRA directory: loaded on demand, then listed
        status, text = await _post(http, f"{base}/v1/completions",
                                   {"model": "od", "prompt": "hi", "max_tokens": 1})
        assert status == 200, text
        assert json.loads(text)["model"] == "od"
        assert await _models(http, base) == {MODEL: None, "b": MODEL, "od": MODEL}


async def test_runtime_endpoints_need_runtime_updating(model_dir: Path) -> None:
    cfg = SimConfig(time_scale=0, kv_events=False, loras=["a"])
    tok = ModelTokenizer.from_folder(model_dir, max_model_len=cfg.max_model_len)
    labels = vllm_cache_config_labels(block_size=cfg.block_size, num_gpu_blocks=cfg.num_gpu_blocks)
    metrics = EngineMetrics(MODEL, 0, labels, max_model_len=cfg.max_model_len, enable_lora=True)
    engine = SimEngine(cfg, 0, MODEL, list(range(100, 600)), None, metrics, None)
    server = SimpleNamespace(cfg=cfg, tokenizer=tok, served_model_name=MODEL, model_dir=model_dir)
    test_server = TestServer(EngineApp(server, engine, metrics).app())  # type: ignore[arg-type]
    await test_server.start_server()
    try:
        base = str(test_server.make_url("")).rstrip("/")
        async with aiohttp.ClientSession() as http:
            status, _ = await _post(http, f"{base}/v1/load_lora_adapter",
                                    {"lora_name": "b", "lora_path": "/loras/b"})
            assert status == 404
    finally:
        await test_server.close()
