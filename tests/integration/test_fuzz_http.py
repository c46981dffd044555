"""Property-based fuzzing of the ingress's OpenAI API, with valid traffic flowing alongside.

One stack (2 simulated engines) serves the whole module. Hypothesis throws malformed bodies,
wrong types, huge bodies, odd unicode, bad sampling values, unknown models, bad streaming
options, wrong methods, content types and paths at the ingress, while a background thread keeps
sending valid requests. Oracle per fuzzed request: it is answered within a timeout, never with a
5xx; a 4xx carries an OpenAI-style ``{"error": {"message", "type"}}`` body; a 2xx only comes for a
valid request and is then a well-formed completion or an SSE stream ending in ``data: [DONE]``.
At the end every valid request succeeded and the ingress is still alive.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from infermesh.libs.bus import NatsServer

from ..conftest import ProcessManager
from ..stack import Stack, start_stack

MODEL = "infermesh/tiny-llama"
BODY_LIMIT = 64 * 1024  # the ingress's --max-body-bytes for this module
MAX_MODEL_LEN = 2048  # the engines' context, so "huge" max_tokens is refused quickly
ANSWER_TIMEOUT = 20.0  # seconds: longer than this is a hang
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"

OK, BAD, ANY = "ok", "bad", "any"  # must be 2xx / must be 4xx / either (never 5xx)


class Case:
    """One HTTP request and what the answer must be (a plain class: hypothesis prints repr)."""

    def __init__(self, body: bytes, expect: str, path: str = COMPLETIONS, method: str = "POST",
                 content_type: str | None = "application/json", note: str = "") -> None:
        self.body, self.expect, self.path, self.method = body, expect, path, method
        self.content_type, self.note = content_type, note

    def __repr__(self) -> str:  # hypothesis prints failing cases; keep huge bodies short
        shown = self.body if len(self.body) <= 300 else self.body[:300] + b"...(truncated)"
        return (f"Case({self.method} {self.path} ct={self.content_type!r} expect={self.expect} "
                f"note={self.note!r} body={shown!r} len={len(self.body)})")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    """One stack for the module; every process and the nats-server stopped at the end."""
    srv = NatsServer(max_payload=8 * 1024 * 1024)
    srv.start()
    pm = ProcessManager(tmp_path_factory.mktemp("fuzz-http"), model_dir)
    try:
        yield start_stack(pm, srv, engines=2,
                          settings={"sim": {"max_model_len": MAX_MODEL_LEN},
                                    "ingress": {"max_body_bytes": BODY_LIMIT}})
    finally:
        pm.stop_all()
        srv.stop()


# --------------------------------------------------------------------------- HTTP plumbing


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes


def send(base: str, case: Case, timeout: float = ANSWER_TIMEOUT) -> Answer:
    """Send one raw request; a hang shows as a socket timeout (the test fails)."""
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=timeout)
    headers: dict[str, str] = {}
    if case.content_type is not None:
        headers["Content-Type"] = case.content_type
    try:
        try:
            conn.request(case.method, case.path, body=case.body, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a server refusing a huge body may stop reading it; its answer still counts
        r = conn.getresponse()
        return Answer(r.status, r.getheader("Content-Type") or "", r.read())
    finally:
        conn.close()


def check_error_body(a: Answer, case: Case) -> None:
    try:
        err = json.loads(a.body)["error"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"{a.status} without an OpenAI error body: {a.body[:300]!r} "
                             f"for {case!r}") from None
    assert isinstance(err, dict), (a.body[:300], case)
    assert isinstance(err.get("message"), str) and err["message"], (a.body[:300], case)
    assert isinstance(err.get("type"), str) and err["type"], (a.body[:300], case)
    assert "application/json" in a.content_type, (a.content_type, case)


def check_success(a: Answer, case: Case) -> None:
    chat = case.path == CHAT
    if "text/event-stream" in a.content_type:
        events = [ln[len(b"data: "):] for ln in a.body.split(b"\n") if ln.startswith(b"data: ")]
        assert events and events[-1] == b"[DONE]", (a.body[-300:], case)
        for ev in events[:-1]:
            chunk = json.loads(ev)
            assert "error" not in chunk, (chunk, case)
            assert chunk["object"] == ("chat.completion.chunk" if chat else "text_completion")
        return
    doc = json.loads(a.body)
    assert doc["object"] == ("chat.completion" if chat else "text_completion"), (doc, case)
    assert doc["choices"] and "usage" in doc, (doc, case)


def check(base: str, case: Case) -> Answer:
    """Send ``case`` and hold the answer to the oracle."""
    t0 = time.monotonic()
    a = send(base, case)
    took = time.monotonic() - t0
    assert took < ANSWER_TIMEOUT, (took, case)
    assert a.status < 500, f"{a.status} {a.body[:500]!r} for {case!r}"
    if a.status >= 400:
        assert case.expect != OK, f"valid request refused: {a.status} {a.body[:500]!r} {case!r}"
        if case.method != "HEAD":
            check_error_body(a, case)
    else:
        assert 200 <= a.status < 300, (a.status, case)
        assert case.expect != BAD, f"invalid request accepted: {a.body[:300]!r} {case!r}"
        check_success(a, case)
    return a


# --------------------------------------------------------------------------- strategies


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


def valid_body(chat: bool, stream: bool = False, prompt: Any = "hello there",
               max_tokens: int = 3) -> dict[str, Any]:
    b: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens}
    if chat:
        b["messages"] = [{"role": "user", "content": prompt}]
    else:
        b["prompt"] = prompt
    if stream:
        b["stream"] = True
    return b


odd_text = st.one_of(
    st.text(min_size=1, max_size=200),
    st.sampled_from([
        "\u202eevil\u202c",  # RTL override
        "\u200f\u200e\u2066x\u2069",  # direction marks and isolates
        "a\u0301\u0302\u0303\u0304" * 20,  # stacked combining marks
        "👩‍👩‍👧‍👦🏳️‍🌈🇺🇳" * 5,  # emoji ZWJ sequences and flags
        "x\x00y\x00z",  # NUL inside a string
        "\ufeffbom",
        "\U0010ffff\U000e0001",  # highest code point, language tag
        "Z̸̡̨̛͖̘͎̱̪̝̗̳̈́́̀̈́͊̂͑̈́a̵̢̛̺͓̘͎̩̺̎͑͊l̷̢̛̖̼̗̳̣̫͈͙͌̓̐̀͒g̷̨͕̦͖̠͙͐͑̅̽̐͝o̶̧̟̝͖̫̠̺̍̀͐̀̈́",
        "\t\r\n\x0b\x0c\x1b[31m",
        "ﷺ" * 50,  # one code point, many glyphs
    ]),
)

# Field values that are wrong for both endpoints (vLLM's checks), all must be refused.
BAD_VALUES: dict[str, list[Any]] = {
    "max_tokens": [-1, -(2**70), 2**64, 10**30, MAX_MODEL_LEN + 1, 1.5, "x", "", [3], {"a": 1},
                   float("1e300")],
    "n": [0, -1, 10**9, 2**64, 1.5, "two", [1], {}],
    "temperature": [-0.5, 2.5, 1e308, "hot", [1.0], {}],
    "top_p": [0, -1, 1.5, "x"],
    "presence_penalty": [3, -3, "x"],
    "frequency_penalty": [2.5, [0]],
    "stream": ["yes", 1, 0, [], {}, "true"],
    "stream_options": ["x", 5, [], [True], {"include_usage": "maybe"}],
    "model": [7, 1.5, [], {}, True],
    "stop": [5, [1, 2], {"s": 1}, [""]],
    "seed": ["x", 1.5, []],
    "min_tokens": [-1, "x", 10**6],
    "logit_bias": ["x", [1], {"1": "x"}],
    "tools": ["x", 5, [1], ["x"]],
    "chat_template_kwargs": ["x", 5, [1]],
    "add_generation_prompt": ["x", 5, []],
    "cache_salt": [5, [], {}],
}
COMPLETION_BAD: dict[str, list[Any]] = {
    "prompt": [5, 1.5, True, {}, {"text": "x"}, [1, "x"], [], None],
    "logprobs": [-1, "x", [1], {}, 1.5, 10**6],
    "echo": ["x", [], 5],
}
CHAT_BAD: dict[str, list[Any]] = {
    "messages": ["hi", [], [1], ["hi"], None, {}, [[]], 5],
    "logprobs": ["x", [1], {}],
    "top_logprobs": [-1, "x", 10**6],
    "max_completion_tokens": [-1, 0, "x", 10**30],
    "tool_choice": [5, [1]],
}
# Valid JSON of doubtful meaning: answered 2xx or 4xx, never 5xx.
DOUBTFUL_MESSAGES: list[Any] = [
    [{"role": "wizard", "content": "hi"}],
    [{"role": "user"}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "user", "content": [{"type": "text"}]}],
    [{"role": "user", "content": [5, None, "x"]}],
    [{"role": "user", "content": {"text": "hi"}}],
    [{"role": 5, "content": "hi"}],
    [{"content": "hi"}],
    [{"role": "tool", "content": "x", "tool_call_id": 5}],
    [{"role": "assistant", "content": "x", "tool_calls": "nope"}],
    [{"role": "assistant", "content": "x", "tool_calls": [{"function": 5}]}],
    [{"role": "system", "content": "s"}, {"role": "system", "content": "t"}],
    [{"role": "user", "content": "hi", "name": ["x"]}],
]
DOUBTFUL_TOOLS: list[Any] = [
    [{}], [{"type": "function"}], [{"type": "function", "function": 5}],
    [{"type": "function", "function": {"name": 5, "parameters": "x"}}],
    [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    [{"type": "retrieval"}],
]


@st.composite
def wrong_type(draw: st.DrawFn) -> Case:
    chat = draw(st.booleans())
    table = {**BAD_VALUES, **(CHAT_BAD if chat else COMPLETION_BAD)}
    name = draw(st.sampled_from(sorted(table)))
    value = draw(st.sampled_from(table[name]))
    body = valid_body(chat, stream=draw(st.booleans()) and name != "stream")
    body[name] = value
    if name == "tools" and not chat:
        body["tools"] = value  # the ingress checks `tools`' shape for both endpoints
    return Case(_dump(body), BAD, CHAT if chat else COMPLETIONS, note=f"{name}={value!r}")


@st.composite
def doubtful_chat(draw: st.DrawFn) -> Case:
    body = valid_body(True, stream=draw(st.booleans()))
    if draw(st.booleans()):
        body["messages"] = draw(st.sampled_from(DOUBTFUL_MESSAGES))
    else:
        body["tools"] = draw(st.sampled_from(DOUBTFUL_TOOLS))
    return Case(_dump(body), ANY, CHAT, note="doubtful chat shape")


@st.composite
def valid_request(draw: st.DrawFn) -> Case:
    """Requests that must succeed, with odd unicode and every streaming option."""
    chat = draw(st.booleans())
    stream = draw(st.booleans())
    prompt: Any = draw(st.one_of(odd_text, st.lists(st.integers(10, 3000), min_size=1,
                                                    max_size=40)))
    if chat and not isinstance(prompt, str):
        prompt = "ids " + " ".join(map(str, prompt))
    body = valid_body(chat, stream, prompt, max_tokens=draw(st.integers(1, 6)))
    if stream and draw(st.booleans()):
        body["stream_options"] = draw(st.sampled_from([
            {"include_usage": True}, {"include_usage": False},
            {"include_usage": True, "continuous_usage_stats": True}, {}]))
    if draw(st.booleans()):
        body["temperature"] = draw(st.sampled_from([0, 0.0, 0.7, 2, 1e-9]))
    if draw(st.booleans()):
        body["n"] = 1
    if not chat and draw(st.booleans()):
        body["logprobs"] = draw(st.integers(0, 5))
    if chat and draw(st.booleans()):
        body["logprobs"] = True
        body["top_logprobs"] = draw(st.integers(0, 5))
    if draw(st.booleans()):
        body["user"] = draw(odd_text)  # unknown-to-routing fields pass through
    if draw(st.booleans()):
        body["model"] = None  # the default model
    return Case(_dump(body), OK, CHAT if chat else COMPLETIONS, note="valid")


@st.composite
def malformed_json(draw: st.DrawFn) -> Case:
    chat = draw(st.booleans())
    text = _dump(valid_body(chat, prompt=draw(odd_text)))
    how = draw(st.sampled_from(["truncate", "trailing", "swap", "nan", "dupe-comma"]))
    if how == "truncate":
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif how == "trailing":
        text += draw(st.sampled_from([b"x", b"}", b",", b"\x00", b"{}"]))
    elif how == "swap":
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + draw(st.sampled_from([b"{", b"]", b":", b"\"", b"\\", b"\xff"])) + \
            text[i + 1:]
    elif how == "nan":
        text = text.replace(b'"max_tokens": 3', b'"max_tokens": NaN')
    else:
        text = text.replace(b", ", b",, ", 1)
    # A swap can land inside a string and leave valid JSON: then only "never 5xx" holds.
    try:
        json.loads(text)
        expect = ANY
    except ValueError:
        expect = BAD
    return Case(text, expect, CHAT if chat else COMPLETIONS, note=f"malformed:{how}")


@st.composite
def raw_bytes(draw: st.DrawFn) -> Case:
    data = draw(st.one_of(st.binary(max_size=600),
                          st.sampled_from([b"", b"null", b"[]", b"{}", b"0", b"\"x\"", b"true",
                                           b"\xef\xbb\xbf{}", b"[" * 5000, b"{\"a\":" * 3000,
                                           b"\xff\xfe{\x00}\x00", b"{\"prompt\": \"\xc3\x28\"}"])))
    return Case(data, BAD, draw(st.sampled_from([COMPLETIONS, CHAT])), note="raw bytes")


@st.composite
def huge_body(draw: st.DrawFn) -> Case:
    chat = draw(st.booleans())
    over = draw(st.integers(1, 64 * 1024))
    body = valid_body(chat, prompt="")
    pad = BODY_LIMIT + over
    if chat:
        body["messages"][0]["content"] = "y" * pad
    else:
        body["prompt"] = "y" * pad
    return Case(_dump(body), BAD, CHAT if chat else COMPLETIONS, note=f"huge +{over}")


@st.composite
def long_prompt(draw: st.DrawFn) -> Case:
    """Under the body limit but far over the context: a 400 from the length check."""
    chat = draw(st.booleans())
    word = draw(st.sampled_from(["token ", "ü ", "日本 ", "🙂"]))
    body = valid_body(chat, prompt=word * 5000)  # > 2 * MAX_MODEL_LEN tokens, < BODY_LIMIT
    return Case(_dump(body), BAD, CHAT if chat else COMPLETIONS, note="over context")


@st.composite
def lone_surrogates(draw: st.DrawFn) -> Case:
    """Escaped lone surrogates are legal JSON text; refusing or replacing them is fine."""
    chat = draw(st.booleans())
    esc = draw(st.sampled_from(["\\ud800", "\\udfff", "a\\ud83dz", "\\udc00\\ud800"]))
    text = _dump(valid_body(chat, prompt="PLACEHOLDER")).replace(b"PLACEHOLDER", esc.encode())
    return Case(text, ANY, CHAT if chat else COMPLETIONS, note="lone surrogate")


@st.composite
def unknown_model(draw: st.DrawFn) -> Case:
    chat = draw(st.booleans())
    name = draw(st.one_of(odd_text, st.sampled_from(["", " ", MODEL + " ", MODEL.upper(),
                                                     "../" + MODEL, MODEL + "\x00"])))
    body = valid_body(chat)
    body["model"] = name
    return Case(_dump(body), BAD, CHAT if chat else COMPLETIONS, note="unknown model")


@st.composite
def stream_options_without_stream(draw: st.DrawFn) -> Case:
    chat = draw(st.booleans())
    body = valid_body(chat)
    body["stream"] = draw(st.sampled_from([False, None]))
    body["stream_options"] = {"include_usage": True}
    return Case(_dump(body), BAD, CHAT if chat else COMPLETIONS, note="stream_options, no stream")


@st.composite
def odd_request_line(draw: st.DrawFn) -> Case:
    """Wrong methods, unknown paths, wrong content types."""
    kind = draw(st.sampled_from(["method", "path", "content_type"]))
    body = _dump(valid_body(False))
    if kind == "method":
        method, path = draw(st.sampled_from([
            ("GET", COMPLETIONS), ("PUT", COMPLETIONS), ("DELETE", CHAT), ("PATCH", CHAT),
            ("OPTIONS", COMPLETIONS), ("POST", "/v1/models"), ("PUT", "/health"),
            ("POST", "/metrics")]))
        return Case(body, BAD, path, method=method, note="wrong method")
    if kind == "path":
        tail = draw(st.from_regex(r"[A-Za-z0-9._~%!$&'()*+,;=:@/-]{0,40}", fullmatch=True))
        path = draw(st.sampled_from(["/", "/v1/", "/v2/", "/v1/completions/", "/V1/"])) + tail
        if path in {COMPLETIONS, CHAT, "/v1/models", "/health", "/metrics"}:
            path += "/x"
        return Case(body, BAD, path, method=draw(st.sampled_from(["GET", "POST"])),
                    note="unknown path")
    ct = draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded",
                               "multipart/form-data; boundary=x", "application/json; charset=x",
                               "", "\u00e9/\u00e9".encode().decode("latin-1"), None]))
    # As vLLM: only an application/json media type is served (parameters are ignored).
    media = (ct or "").lower().split(";", 1)[0].strip()
    return Case(body, ANY if media == "application/json" else BAD,
                draw(st.sampled_from([COMPLETIONS, CHAT])), content_type=ct, note="content type")


fuzz_cases = st.one_of(
    valid_request(), wrong_type(), doubtful_chat(), malformed_json(), raw_bytes(), huge_body(),
    long_prompt(), lone_surrogates(), unknown_model(), stream_options_without_stream(),
    odd_request_line(),
)


# --------------------------------------------------------------------------- background traffic


class ValidTraffic:
    """A thread that keeps sending valid requests (completions and chat, streamed or not)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.sent = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="valid-traffic", daemon=True)

    def __enter__(self) -> ValidTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(ANSWER_TIMEOUT + 5)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            chat, stream = bool(i & 1), bool(i & 2)
            case = Case(_dump(valid_body(chat, stream, prompt=f"steady traffic {i}")), OK,
                        CHAT if chat else COMPLETIONS, note="background")
            self.sent += 1
            try:
                check(self.base, case)
            except (AssertionError, OSError, ValueError, KeyError) as e:
                self.failed.append(f"{type(e).__name__}: {str(e)[:300]}")
            i += 1


# --------------------------------------------------------------------------- the test


def test_fuzzed_http_gets_clean_answers_while_valid_traffic_flows(stack: Stack) -> None:
    base = stack.ingress_url
    assert stack.ingress is not None
    tally: dict[int, int] = {}

    @settings(max_examples=250, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
    @given(case=fuzz_cases)
    # Regressions and edges that must be tried every run, not left to luck.
    @example(case=Case(b'{"model": "' + MODEL.encode() + b'", "prompt": "x", "max_tokens": '
                       + str(2**64).encode() + b"}", BAD, note="max_tokens past uint64"))
    @example(case=Case(_dump({**valid_body(False), "stream": True,
                              "stream_options": {"include_usage": True}}), OK, note="usage"))
    @example(case=Case(_dump(valid_body(True, prompt="x" * (BODY_LIMIT + 1))), BAD, CHAT,
                       note="just over the body limit"))
    @example(case=Case(b"x" * (1024 * 1024), BAD, note="1 MiB of junk"))
    @example(case=Case(b'{"prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}", BAD,
                       note="deep nesting was a 500 (RecursionError)"))
    @example(case=Case(b'{"a":' * 3000, BAD, CHAT, note="deep unclosed nesting"))
    @example(case=Case(b"", BAD, method="GET", path="/v1/../v1/models/../../etc", note="dots"))
    def run(case: Case) -> None:
        a = check(base, case)
        tally[a.status] = tally.get(a.status, 0) + 1

    with ValidTraffic(base) as traffic:
        run()
    print(f"\nfuzzed HTTP answers by status: {dict(sorted(tally.items()))}; "
          f"valid background requests sent={traffic.sent} failed={len(traffic.failed)}")
    assert traffic.sent > 0
    assert not traffic.failed, traffic.failed[:5]
    assert stack.ingress.alive(), stack.ingress.tail()
    # And the ingress still serves after the fuzz.
    check(base, Case(_dump(valid_body(False)), OK, note="after the fuzz"))
