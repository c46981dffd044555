"""EngineApp in-process (aiohttp test server, real tokenizer, real engine at time_scale 0).

The main check: a ~1 MB prompt is tokenized off the event loop, so the engine's /health
and /metrics answer while that request is still being tokenized. The tokenizer is the
real one behind a gate that holds big encodes until the test opens it; ordering, not
timing, decides the outcome.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from infermesh.libs.tokenization import ModelTokenizer
from infermesh.services.sim.app import OFFLOAD_MIN_BYTES, EngineApp
from infermesh.services.sim.config import SimConfig
from infermesh.services.sim.engine import SimEngine
from infermesh.services.sim.metrics import EngineMetrics, vllm_cache_config_labels

MODEL = "tiny"
BIG_TEXT = "word " * 200_000  # 1 MB, ~200k tokens


class GatedTokenizer:
    """The real tokenizer, except that encoding a big text waits until ``release`` is set.

    On the event loop it must not wait (nothing could ever release it): it notes
    ``on_loop`` and goes on, and the test fails on that. ``encode()`` of a big text is
    noted too, wherever it runs: tokenizers holds the GIL through it, so even in a worker
    thread it would stall the loop (``encode_batch()`` releases the GIL).
    """

    def __init__(self, real: ModelTokenizer) -> None:
        self._real = real
        self.entered = threading.Event()
        self.release = threading.Event()
        self.on_loop = False
        self.holds_gil = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _gate(self, text: str) -> None:
        if len(text) < OFFLOAD_MIN_BYTES:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # a worker thread: hold here until the test lets go
            self.entered.set()
            self.release.wait(60)
        else:
            self.on_loop = True

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.holds_gil |= len(text) >= OFFLOAD_MIN_BYTES
        self._gate(text)
        return self._real.encode(text, add_special_tokens)

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        for text in texts:
            self._gate(text)
        return self._real.encode_batch(texts, add_special_tokens)


@pytest.fixture
async def app(model_dir: Path) -> AsyncIterator[tuple[str, GatedTokenizer]]:
    """One engine's HTTP front on a free port; yields its base URL and the gated tokenizer."""
    cfg = SimConfig(time_scale=0, kv_events=False, max_model_len=400_000)
    tok = GatedTokenizer(ModelTokenizer.from_folder(model_dir, max_model_len=cfg.max_model_len))
    labels = vllm_cache_config_labels(block_size=cfg.block_size, num_gpu_blocks=cfg.num_gpu_blocks)
    metrics = EngineMetrics(MODEL, 0, labels, max_model_len=cfg.max_model_len)
    engine = SimEngine(cfg, 0, MODEL, list(range(100, 600)), None, metrics, None)
    engine.start()
    server = SimpleNamespace(cfg=cfg, tokenizer=tok, served_model_name=MODEL, model_dir=model_dir)
    test_server = TestServer(EngineApp(server, engine, metrics).app())  # type: ignore[arg-type]
    await test_server.start_server()
    try:
        yield str(test_server.make_url("")), tok
    finally:
        tok.release.set()
        await test_server.close()
        await engine.stop()


async def _post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(
        url, data=json.dumps(body), headers={"Content-Type": "application/json"}
    ) as r:
        return r.status, await r.json()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": BIG_TEXT, "max_tokens": 2}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": BIG_TEXT}], "max_tokens": 2},
        ),
        ("/tokenize", {"prompt": BIG_TEXT}),
    ],
    ids=["completion", "chat", "tokenize"],
)
async def test_big_prompt_is_tokenized_while_health_and_metrics_answer(
    app: tuple[str, GatedTokenizer], path: str, body: dict[str, Any]
) -> None:
    base, tok = app
    async with aiohttp.ClientSession() as http:
        big = asyncio.create_task(_post(http, base + path, body))
        while not (tok.entered.is_set() or tok.on_loop or big.done()):
            await asyncio.sleep(0.005)
        assert not tok.on_loop, "the big prompt was tokenized on the event loop"
        assert not tok.holds_gil, "the big prompt went through encode(), which holds the GIL"
        assert tok.entered.is_set(), f"the big prompt never reached a worker thread: {big.result()}"
        # The big request is parked inside the tokenizer: the engine still answers.
        async with http.get(f"{base}/health") as r:
            assert r.status == 200
        async with http.get(f"{base}/metrics") as r:
            assert r.status == 200 and "vllm:num_requests_running" in await r.text()
        assert not big.done()
        tok.release.set()
        status, data = await big
    assert status == 200, data
    if path == "/tokenize":
        assert data["count"] > 100_000
    else:
        assert data["usage"]["prompt_tokens"] > 100_000
        assert data["usage"]["completion_tokens"] == 2


async def test_small_prompts_stay_on_the_loop(app: tuple[str, GatedTokenizer]) -> None:
    base, tok = app
    async with aiohttp.ClientSession() as http:
        status, data = await _post(
            http, f"{base}/v1/completions", {"prompt": "hello", "max_tokens": 1}
        )
    assert status == 200 and not tok.entered.is_set() and not tok.on_loop


async def test_bad_content_part_is_refused_when_the_prompt_is_rendered(
    app: tuple[str, GatedTokenizer],
) -> None:
    # As in vLLM, list content is checked lazily: the body validates, the rendering refuses it.
    base, _ = app
    async with aiohttp.ClientSession() as http:
        status, data = await _post(
            http, f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": [5]}]}
        )
    assert status == 400
    assert data["error"]["type"] == "BadRequestError" and data["error"]["param"] is None
    assert "validation error" in data["error"]["message"]


async def test_unknown_model_is_refused_before_the_sampling_checks(
    app: tuple[str, GatedTokenizer],
) -> None:
    # vLLM checks the model name first: 404, not the 400 a bad temperature would get.
    base, _ = app
    async with aiohttp.ClientSession() as http:
        status, data = await _post(
            http, f"{base}/v1/completions", {"model": "nope", "prompt": "x", "temperature": 5}
        )
    assert status == 404 and data["error"]["param"] == "model"
