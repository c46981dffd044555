"""Record a real vLLM 0.32 server's answers on the endpoints peer routers call.

Not run by the test suite. Start vLLM as ``docs/vllm.md`` describes (the tiny model,
``--served-model-name infermesh/tiny-llama --block-size 32 --max-model-len 2048``), with
``VLLM_SERVER_DEV_MODE=1`` and ``--enable-scale-out``, then::

    .venv/bin/python tests/unit/sim/gen_vllm_render_recordings.py http://127.0.0.1:PORT

It writes ``vllm_render_recordings.json`` beside itself: for each request below, vLLM's
status and body, verbatim. Every request fixes its id (``X-Request-Id`` or the body's
``request_id``), so the bodies hold no random part. ``test_render.py`` replays them on the
simulator.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

OUT_PATH = Path(__file__).with_name("vllm_render_recordings.json")

LONG = " ".join(["word"] * 3000)
MSG = [{"role": "user", "content": "Hi there"}]
CMPL = "/v1/completions/render"
CHAT = "/v1/chat/completions/render"

#: (method, path, X-Request-Id header or None, body or None)
CASES: list[tuple[str, str, str | None, Any]] = [
    # completions: one text prompt, a batch, token ids
    ("POST", CMPL, "r1", {"model": "infermesh/tiny-llama",
                          "prompt": "Hello world, this is a test"}),
    ("POST", CMPL, None, {"prompt": ["Hello world", "second one"], "max_tokens": 5,
                          "request_id": "abc"}),
    ("POST", CMPL, "r2", {"prompt": [1, 2, 3], "stream": True}),
    ("POST", CMPL, "r3", {"prompt": [[1, 2], [3]], "max_tokens": 2040}),
    ("POST", CMPL, "r4", {"prompt": ["only one"]}),
    ("POST", CMPL, "r5", {"prompt": [99999]}),
    # sampling parameters as SamplingParams dumps them
    ("POST", CMPL, "r6", {
        "prompt": "hi", "n": 2, "temperature": 0.5, "seed": 7, "stop": "xyz",
        "ignore_eos": True, "min_tokens": 2, "max_tokens": 300, "logprobs": 2, "top_k": 5,
        "stream": True, "stream_options": {"include_usage": True}, "cache_salt": "s",
        "skip_special_tokens": False, "stop_token_ids": [5, 5, 6], "bad_words": ["a", "a"],
        "presence_penalty": 0.5}),
    ("POST", CMPL, "r7", {"prompt": "hi", "temperature": 0, "echo": True, "max_tokens": 0}),
    ("POST", CMPL, "r8", {"prompt": "hi", "temperature": 0.001}),
    ("POST", CMPL, "r9", {
        "prompt": "hi", "prompt_logprobs": 1, "spaces_between_special_tokens": False,
        "min_p": 0.1, "repetition_penalty": 1.1, "frequency_penalty": 0.1, "top_p": 0.5,
        "logit_bias": {"5": 1.5, "6": 500}, "allowed_token_ids": [1, 2],
        "vllm_xargs": {"a": 1}, "kv_transfer_params": {"k": 1}, "seed": -1,
        "stream_interval": 2, "echo": True, "logprobs": 3}),
    ("POST", CMPL, "r10", {"prompt": "hi", "response_format": {"type": "json_object"}}),
    ("POST", CMPL, "r11", {"prompt": "hi", "structured_outputs": {"regex": "a+"},
                           "thinking_token_budget": 5, "routed_experts_prompt_start": 1,
                           "watermarking": True}),
    ("POST", CMPL, "r12", {"prompt": "hi", "max_tokens": 2047}),
    ("POST", CMPL, "r13", {"prompt": "hi", "max_tokens": None, "top_k": -1}),
    ("POST", CMPL, "r14", {"prompt": "hi", "repetition_detection": {
        "max_pattern_size": 3, "min_pattern_size": 1, "min_count": 2}}),
    # completions refused
    ("POST", CMPL, None, {}),
    ("POST", CMPL, None, {"prompt": 5}),
    ("POST", CMPL, None, {"prompt": "hi", "model": "nope"}),
    ("POST", CMPL, None, {"prompt": "hi", "max_tokens": 5000}),
    ("POST", CMPL, None, {"prompt": "hi", "use_beam_search": True}),
    ("POST", CMPL, None, {"prompt": ""}),
    ("POST", CMPL, None, {"prompt": []}),
    ("POST", CMPL, None, {"prompt": "hi", "temperature": 3}),
    ("POST", CMPL, None, {"prompt": "hi", "n": 3, "temperature": 0}),
    ("POST", CMPL, None, {"prompt": "hi", "stream_options": {"include_usage": True}}),
    ("POST", CMPL, None, {"prompt": LONG}),
    ("POST", CMPL, None, {"prompt": list(range(2100))}),
    ("POST", CMPL, None, {"prompt": "hi", "prompt_embeds": "abc"}),
    ("POST", CMPL, None, {"prompt": "hi", "logit_bias": {"x": 1}}),
    ("POST", CMPL, None, {"prompt": "hi", "min_tokens": 30, "max_tokens": 20}),
    ("POST", CMPL, None, b"not json"),
    # chat
    ("POST", CHAT, "c1", {"model": "infermesh/tiny-llama", "messages": MSG}),
    ("POST", CHAT, "c2", {"messages": MSG, "max_completion_tokens": 7, "stream": True,
                          "logprobs": True, "top_logprobs": 2}),
    ("POST", CHAT, "c3", {"messages": MSG, "max_tokens": 2048, "cache_salt": "salt",
                          "priority": 3}),
    ("POST", CHAT, "c4", {"messages": [{"role": "system", "content": "S"}, *MSG],
                          "add_generation_prompt": False}),
    ("POST", CHAT, "c5", {"messages": MSG, "include_reasoning": False, "temperature": 1,
                          "n": 2}),
    ("POST", CHAT, None, {"messages": MSG, "request_id": "body-id"}),
    # chat refused
    ("POST", CHAT, None, {"messages": []}),
    ("POST", CHAT, None, {}),
    ("POST", CHAT, None, {"messages": MSG, "model": "zzz"}),
    ("POST", CHAT, None, {"messages": [{"role": "bogus", "content": "Hi"}]}),
    ("POST", CHAT, None, {"messages": MSG, "use_beam_search": True}),
    ("POST", CHAT, None, {"messages": MSG, "n": 2, "temperature": 0}),
    ("POST", CHAT, None, {"messages": [{"role": "user", "content": LONG}]}),
    ("POST", CHAT, None, {"messages": MSG, "max_tokens": 0}),
    # /tokenize (vllm-router's fallback when render is missing)
    ("POST", "/tokenize", None, {"prompt": "Hello world"}),
    ("POST", "/tokenize", None, {"prompt": "Hello world", "add_special_tokens": False,
                                 "return_token_strs": True}),
    ("POST", "/tokenize", None, {"messages": MSG, "return_token_strs": True}),
    ("POST", "/tokenize", None, {"messages": MSG, "add_generation_prompt": False,
                                 "add_special_tokens": True}),
    ("POST", "/tokenize", None, {}),
    ("POST", "/tokenize", None, {"messages": []}),
    # /server_info's query check
    ("GET", "/server_info?config_format=bad", None, None),
]


def record(base: str, case: tuple[str, str, str | None, Any]) -> dict[str, Any]:
    """Send one case; its status and verbatim body."""
    method, path, rid, body = case
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if rid is not None:
        headers["X-Request-Id"] = rid
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    raw = body.decode() if isinstance(body, bytes) else None
    return {"method": method, "path": path, "request_id": rid,
            "body": None if raw is not None else body, "raw_body": raw,
            "status": status, "response": text}


def main() -> None:
    base = sys.argv[1].rstrip("/")
    with urllib.request.urlopen(base + "/version", timeout=10) as r:
        version = json.loads(r.read())["version"]
    cases = [json.dumps(record(base, c), ensure_ascii=False) for c in CASES]
    # One case a line: diffs stay readable.
    OUT_PATH.write_text(f'{{"vllm_version": {json.dumps(version)}, "cases": [\n'
                        + ",\n".join(cases) + "\n]}\n")
    print(f"wrote {len(CASES)} cases to {OUT_PATH}")


if __name__ == "__main__":
    main()
