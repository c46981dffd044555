"""A streaming OpenAI client that measures each request: TTFT, inter-token gaps, end to end,
tokens, cached tokens and the endpoint that served (infermesh's ``x-infermesh-endpoint``).

It speaks plain OpenAI streaming (``stream_options.include_usage``), so it measures a bare vLLM
or another router as well as infermesh's ingress.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import msgspec

from .metrics import RequestResult
from .workload import BenchRequest


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None
    delta: _Delta | None = None


class _Details(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _Details | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None


_chunk = msgspec.json.Decoder(_Chunk)


def request_body(req: BenchRequest, model: str, *, ignore_eos: bool = True) -> dict[str, Any]:
    """The JSON body for one benchmark request (streamed, usage requested)."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": req.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
    }
    if ignore_eos:  # vLLM's extension: generate exactly max_tokens, as benchmarks do
        body["ignore_eos"] = True
    if req.kind == "chat":
        body["messages"] = req.messages
    else:
        body["prompt"] = req.prompt
    return body


async def send(
    http: aiohttp.ClientSession,
    base_url: str,
    req: BenchRequest,
    *,
    model: str,
    profile: str,
    run_start: float,
    offered_rate: float,
    headers: dict[str, str] | None = None,
    ignore_eos: bool = True,
) -> RequestResult:
    """Send one request, stream the answer, and measure it."""
    path = "/v1/chat/completions" if req.kind == "chat" else "/v1/completions"
    res = RequestResult(id=req.id, ok=False, status=0, error=None,
                        start_s=time.perf_counter() - run_start, ttft_s=None, e2e_s=None,
                        itl_s=[], prompt_tokens=req.prompt_tokens, output_tokens=0,
                        cached_tokens=0, endpoint=None, profile=profile,
                        offered_rate_qps=offered_rate, tag=req.tag)
    if req.headers:
        headers = {**(headers or {}), **dict(req.headers)}
    t0 = time.perf_counter()
    last: float | None = None
    try:
        async with http.post(base_url + path, json=request_body(req, model,
                                                                ignore_eos=ignore_eos),
                             headers=headers or {}) as r:
            res.status = r.status
            res.endpoint = r.headers.get("x-infermesh-endpoint")
            if r.status != 200:
                res.error = (await r.text())[:300]
                return res
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                try:
                    chunk = _chunk.decode(data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    if b'"error"' in data:
                        res.error = data.decode(errors="replace")[:300]
                        return res
                    continue
                now = time.perf_counter()
                if any((c.text or (c.delta.content if c.delta else None)) for c in chunk.choices):
                    if last is None:
                        res.ttft_s = now - t0
                    else:
                        res.itl_s.append(now - last)
                    last = now
                if chunk.usage is not None:
                    u = chunk.usage
                    res.prompt_tokens = u.prompt_tokens or res.prompt_tokens
                    res.output_tokens = u.completion_tokens
                    d = u.prompt_tokens_details
                    res.cached_tokens = (d.cached_tokens or 0) if d else 0
        res.e2e_s = time.perf_counter() - t0
        res.ok = res.ttft_s is not None
        if not res.ok:
            res.error = "no tokens streamed"
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res
