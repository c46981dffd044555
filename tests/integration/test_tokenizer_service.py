"""The tokenizer service on a real nats-server: replicas share ``im.tokenize`` in a queue group,
garbage gets a 400 and the service keeps serving, unknown models a 404, and the ids for chats are
what a running simulator's ``/tokenize`` returns."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats.errors
import pytest
from nats.aio.client import Client

from infermesh.libs.bus import NatsServer, RemoteError, connect, request
from infermesh.libs.kvblock import prompt_keys
from infermesh.libs.process.process import Process
from infermesh.libs.process.ready import wait_bus_services
from infermesh.libs.tinymodel import DEFAULT_MODEL_NAME
from infermesh.libs.tinymodel.corpus import corpus
from infermesh.libs.tokenization import ModelTokenizer
from infermesh.proto.messages import TokenizeReply, TokenizeRequest
from infermesh.services.tokenizer.config import TokenizerConfig
from infermesh.services.tokenizer.service import TokenizerService

MODEL = DEFAULT_MODEL_NAME
SUBJECT = "im.tokenize"
SERVICE = "infermesh-tokenizer"
ERROR_CODE = "Nats-Service-Error-Code"


async def service_replies(nc: Client, verb: str, want: int = 0,
                          window: float = 0.3) -> list[dict[str, Any]]:
    """Replies of every tokenizer instance to ``$SRV.<verb>`` (stops early at ``want``)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    out: list[dict[str, Any]] = []
    try:
        await nc.publish(f"$SRV.{verb}.{SERVICE}", b"", reply=inbox)
        with contextlib.suppress(nats.errors.TimeoutError, asyncio.TimeoutError):
            while not want or len(out) < want:
                msg = await sub.next_msg(timeout=window)
                if msg.data:  # not the server's empty "no responders" status
                    out.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()
    return out


async def wait_replicas(nc: Client, n: int, proc: Process | None = None,
                        timeout: float = 60.0) -> None:
    await wait_bus_services(nc, {"infermesh-tokenizer": n}, timeout, [proc] if proc else [])


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Client]:
    nc = await connect(nats_server.url, "test")
    yield nc
    await nc.close()


@pytest.fixture
async def local(nats_server: NatsServer, model_dir: Path) -> AsyncIterator[TokenizerService]:
    """A replica in this process (its /health and /metrics on a free port)."""
    svc = TokenizerService(TokenizerConfig(nats_url=nats_server.url, http_port=0,
                                           models=[f"{MODEL}={model_dir}"]))
    await svc.start()
    yield svc
    await svc.stop()


@pytest.fixture
def replica(nats_server: NatsServer, model_dir: Path, tmp_path: Path) -> Any:
    """A replica as its own process (`python -m infermesh.services.tokenizer`)."""
    p = Process("tokenizer", [sys.executable, "-m", "infermesh.services.tokenizer", "--nats-url",
              nats_server.url, "--models", f"{MODEL}={model_dir}", "--http-port", "-1"],
             log=tmp_path / "tokenizer.log").start()
    yield p
    p.stop()


def tokenize(**kw: Any) -> TokenizeRequest:
    kw.setdefault("model", MODEL)
    kw.setdefault("block_size", 16)
    return TokenizeRequest(**kw)


async def test_two_replicas_share_the_queue_group(bus: Client, local: TokenizerService,
                                                  replica: Process, model_dir: Path) -> None:
    await wait_replicas(bus, 2, replica)
    tok = ModelTokenizer.from_folder(model_dir)
    docs = list(itertools.islice(corpus(21), 60))
    replies = await asyncio.gather(*(
        request(bus, SUBJECT, tokenize(prompt=d, return_token_ids=True), TokenizeReply,
                timeout=10) for d in docs
    ))
    for d, r in zip(docs, replies, strict=True):
        ids = tok.encode(d)
        assert r.token_ids == ids and r.num_tokens == len(ids)
        assert r.block_keys == prompt_keys(MODEL, ids, 16)
    stats = await service_replies(bus, "STATS", want=2)
    served = {s["id"]: s["endpoints"][0]["num_requests"] for s in stats}
    assert len(served) == 2 and all(n > 0 for n in served.values()), served
    assert sum(served.values()) == len(docs)


async def test_garbage_gets_a_400_and_the_service_keeps_serving(bus: Client, replica: Process
                                                                 ) -> None:
    await wait_replicas(bus, 1, replica)
    garbage = [
        b"",
        b"\xc1\xff not msgpack",
        msgspec.msgpack.encode([1, 2, 3]),
        msgspec.msgpack.encode({"model": 5, "block_size": "x"}),
        msgspec.msgpack.encode({"model": MODEL, "block_size": 16, "prompt": ["a", "b"]}),
        msgspec.msgpack.encode({"model": MODEL, "block_size": 16, "prompt": {"x": 1}}),
        msgspec.msgpack.encode({"model": MODEL, "block_size": 16, "messages": "hi"}),
        msgspec.msgpack.encode({"model": MODEL, "block_size": 16, "prompt": [2**64 - 1]}),
        msgspec.msgpack.encode({"model": MODEL, "block_size": 16, "prompt": [True]}),
        b"\x00" * 100_000,
    ]
    for payload in garbage * 2:
        msg = await bus.request(SUBJECT, payload, timeout=5)
        assert msg.headers and msg.headers.get(ERROR_CODE) == "400", (payload[:40], msg.headers)
    bad = [tokenize(prompt=[10**6]), tokenize(prompt="x", block_size=0),
           tokenize(messages=[{"role": "narrator", "content": "x"}]),
           tokenize(messages=[{"role": "user", "content": "x"}], chat_template="{% if %}")]
    for req in bad:
        with pytest.raises(RemoteError) as e:
            await request(bus, SUBJECT, req, TokenizeReply, timeout=5)
        assert e.value.code == "400", e.value.description
    with pytest.raises(RemoteError) as e:
        await request(bus, SUBJECT, tokenize(model="other/model", prompt="x"), TokenizeReply)
    assert e.value.code == "404"
    r = await request(bus, SUBJECT, tokenize(prompt="still here"), TokenizeReply, timeout=5)
    assert r.num_tokens > 0 and replica.alive()
    assert "Traceback" not in replica.tail(100_000)


async def test_chat_ids_equal_the_simulators_tokenize(bus: Client, replica: Process, procs: Any
                                                      ) -> None:
    _, info = procs.sim("--time-scale", "0")
    base = info["engines"][0]["http"]
    await wait_replicas(bus, 1, replica)
    doc = "\n\n".join(itertools.islice(corpus(22), 40))
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    conversation = [
        {"role": "system", "content": "You are terse.\n" + doc},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"},
                                     {"type": "text", "text": "And 日本?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": -3}"},
        {"role": "assistant", "content": "It is -3 °C."},
        {"role": "user", "content": "Thanks 🙂"},
    ]
    cases: list[dict[str, Any]] = [
        {"messages": conversation[:2]},
        {"messages": conversation, "tools": tools},
        {"messages": conversation, "add_generation_prompt": False},
        {"messages": conversation[:5], "add_generation_prompt": False,
         "continue_final_message": True},
        {"messages": conversation[:2], "chat_template_kwargs": {"bos_token": "<|eot_id|>"}},
        {"messages": conversation[:2], "add_special_tokens": True},
        {"prompt": doc},
        {"prompt": doc, "add_special_tokens": False},
    ]
    async with aiohttp.ClientSession() as http:
        for case in cases:
            async with http.post(f"{base}/tokenize", json={"model": MODEL, **case}) as resp:
                body = await resp.json()
                assert resp.status == 200, body
            for _ in range(2):  # cold, then from the caches
                r = await request(bus, SUBJECT, tokenize(return_token_ids=True, **case),
                                  TokenizeReply, timeout=10)
                assert r.token_ids == body["tokens"], case
                assert r.num_tokens == body["count"]


async def test_health_and_metrics(bus: Client, local: TokenizerService, model_dir: Path) -> None:
    await wait_replicas(bus, 1)
    text = "\n".join(itertools.islice(corpus(23), 30))
    tok = ModelTokenizer.from_folder(model_dir)
    ids = tok.encode(text)
    for i in range(3):
        r = await request(bus, SUBJECT, tokenize(prompt=text), TokenizeReply, timeout=5)
        if i == 0:  # never seen, long: answered with its first chunk's keys, the rest later
            assert r.partial and r.known_tokens is not None and r.known_tokens < len(ids)
            assert r.block_keys == prompt_keys(MODEL, ids[: r.known_tokens], 16)
            assert abs(r.num_tokens - len(ids)) < len(ids) // 4
            assert r.max_num_tokens is not None and r.max_num_tokens >= len(ids)
            await local.drain()  # tokenized in the background: the next ones are cached
        else:
            assert not r.partial and r.num_tokens == len(ids)
            assert r.block_keys == prompt_keys(MODEL, ids, 16)
    with pytest.raises(RemoteError):
        await request(bus, SUBJECT, tokenize(prompt=[-5]), TokenizeReply, timeout=5)
    base = f"http://127.0.0.1:{local.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/health") as resp:
            health = await resp.json()
            assert resp.status == 200 and health["status"] == "ok"
            assert health["models"] == [MODEL] and health["prompt_cache"]["entries"] == 1
        async with http.get(f"{base}/metrics") as resp:
            metrics = await resp.text()
    for line in (
        f'infermesh_tokenizer_requests_total{{kind="text",model="{MODEL}"}} 3.0',
        f'infermesh_tokenizer_requests_total{{kind="ids",model="{MODEL}"}} 1.0',
        'infermesh_tokenizer_errors_total{code="400"} 1.0',
        'infermesh_tokenizer_cache_hits_total{cache="prompt"} 2.0',
        'infermesh_tokenizer_cache_misses_total{cache="prompt"} 1.0',
        'infermesh_tokenizer_seconds_count{kind="text"} 3.0',
        f'infermesh_tokenizer_partial_replies_total{{model="{MODEL}"}} 1.0',
        'infermesh_tokenizer_background_jobs_total{outcome="started"} 1.0',
        "infermesh_tokenizer_background_running 0.0",
        'infermesh_bus_requests_total{endpoint="tokenize",outcome="ok",'
        'service="infermesh-tokenizer"} 3.0',
    ):
        assert line in metrics, line
