"""The tokenizer's handler without a bus: ids equal the tokenization library (and the
transformers-pinned vectors) for prompts and chats, keys equal kvblock's, bad input is a 4xx."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.micro.request import ServiceError
from prometheus_client import generate_latest

from infermesh.libs.kvblock import prompt_keys
from infermesh.libs.tinymodel import DEFAULT_MODEL_NAME
from infermesh.libs.tinymodel.corpus import corpus
from infermesh.libs.tokenization import ModelTokenizer
from infermesh.libs.tokenization.cache import CachingTokenizer
from infermesh.proto.messages import TokenizeReply, TokenizeRequest
from infermesh.services.tokenizer.config import TokenizerConfig
from infermesh.services.tokenizer.service import TokenizerService

MODEL = DEFAULT_MODEL_NAME
VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "libs" / "tokenizer_vectors.json").read_text(encoding="utf-8")
)
CHAT_OPTIONS = ("tools", "chat_template_kwargs", "add_generation_prompt", "continue_final_message")


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.from_folder(model_dir)


@pytest.fixture
def svc(model_dir: Path) -> TokenizerService:
    s = TokenizerService(TokenizerConfig(models=[f"{MODEL}={model_dir}"], chunk_chars=256,
                                         offload_chars=1_000_000))
    s.load_models()
    return s


async def ask(svc: TokenizerService, **kw: Any) -> TokenizeReply:
    kw.setdefault("model", MODEL)
    kw.setdefault("block_size", 16)
    kw.setdefault("return_token_ids", True)
    return await svc.on_tokenize(TokenizeRequest(**kw))


async def refused(svc: TokenizerService, code: str, **kw: Any) -> str:
    with pytest.raises(ServiceError) as e:
        await ask(svc, **kw)
    assert e.value.code == code, e.value.description
    return e.value.description


def test_vectors_are_for_this_model(model_dir: Path) -> None:
    for name, digest in VECTORS["files_sha256"].items():
        assert hashlib.sha256((model_dir / name).read_bytes()).hexdigest() == digest, name


# ---------------------------------------------------------------------------------- prompts


async def test_prompts_equal_the_pinned_vectors(svc: TokenizerService) -> None:
    for case in VECTORS["encode"]:
        for special, expected in ((None, case["ids"]), (True, case["ids"]),
                                  (False, case["ids_no_special"])):
            for _ in range(2):  # cold, then cached
                r = await ask(svc, prompt=case["text"], add_special_tokens=special)
                assert r.token_ids == expected, case["text"]
                assert r.num_tokens == len(expected)
                assert r.block_keys == prompt_keys(MODEL, expected, 16)


async def test_long_prompts_cold_cached_and_prefix_shared(svc: TokenizerService,
                                                          tok: ModelTokenizer) -> None:
    doc = "\n\n".join(itertools.islice(corpus(11), 300))
    for text in (doc, doc, doc[:20000] + " and then?", doc[:20000] + " or else?\n"):
        r = await ask(svc, prompt=text, block_size=32, lora_name="ad", cache_salt="s")
        ids = tok.encode(text)
        assert r.token_ids == ids and r.num_tokens == len(ids)
        assert r.block_keys == prompt_keys(MODEL, ids, 32, lora_name="ad", cache_salt="s")
    # Long texts: the repeat is recalled whole (not looked up in the prompt cache).
    assert svc.tokenizers[MODEL].recall_hits == 1 and svc.chunk_cache.hits > 0


async def test_offloaded_tokenization_is_the_same(model_dir: Path, tok: ModelTokenizer) -> None:
    s = TokenizerService(TokenizerConfig(models=[f"{MODEL}={model_dir}"], offload_chars=0,
                                         chunk_chars=64))
    s.load_models()
    ct = s.tokenizers[MODEL]
    threads: list[str] = []

    def run(plan: Any, **kw: Any) -> None:
        threads.append(threading.current_thread().name)
        CachingTokenizer.run(ct, plan, **kw)

    ct.run = run  # type: ignore[method-assign]
    try:
        text = "\n".join(itertools.islice(corpus(12), 50))
        r = await ask(s, prompt=text)
        assert threads and threads[0].startswith("tokenize")
        assert r.token_ids == tok.encode(text)
        assert s.tokenizers[MODEL].encoded_chars == len(text)
    finally:
        await s.stop()


async def test_token_id_prompts(svc: TokenizerService, tok: ModelTokenizer) -> None:
    ids = list(range(100, 180))
    r = await ask(svc, prompt=ids, lora_name="x")
    assert r.token_ids == ids and r.num_tokens == 80
    assert r.block_keys == prompt_keys(MODEL, ids, 16, lora_name="x")
    r = await ask(svc, prompt=[], return_token_ids=False)
    assert (r.num_tokens, r.block_keys, r.token_ids) == (0, [], None)
    r = await ask(svc, prompt=[0, tok.vocab_size - 1])
    assert r.num_tokens == 2


async def test_token_ids_only_when_asked(svc: TokenizerService) -> None:
    r = await ask(svc, prompt="Hello world " * 20, return_token_ids=False)
    assert r.token_ids is None and r.num_tokens > 16 and len(r.block_keys) == r.num_tokens // 16


# ------------------------------------------------------------------------------------- chat


def _chat_kwargs(case: dict[str, Any]) -> dict[str, Any]:
    return {key: case[key] for key in CHAT_OPTIONS if key in case}


async def test_chats_equal_the_pinned_vectors(svc: TokenizerService, tok: ModelTokenizer) -> None:
    """Every pinned case (tools, tool calls, content parts, continue_final_message, kwargs, ...)
    gives the ids transformers gave, which are also what ModelTokenizer.encode_chat gives."""
    for case in VECTORS["chat"]:
        for _ in range(2):
            r = await ask(svc, messages=case["messages"], **_chat_kwargs(case))
            assert r.token_ids == case["ids"], case["name"]
            assert r.token_ids == tok.encode_chat(case["messages"], **_chat_kwargs(case))
            assert r.block_keys == prompt_keys(MODEL, case["ids"], 16)


async def test_chat_options(svc: TokenizerService, tok: ModelTokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                             {"type": "text", "text": "there"}]}]
    tools = [{"type": "function", "function": {"name": "f", "description": "d",
                                               "parameters": {"type": "object"}}}]
    template = ("{% for d in documents %}[{{ d.title }}]\n{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                "{% if flag %}FLAG{% endif %}")
    docs = [{"title": "one", "text": "1"}, {"title": "two", "text": "2"}]
    cases: list[dict[str, Any]] = [
        {},
        {"add_generation_prompt": False},
        {"tools": tools},
        {"add_special_tokens": True},
        {"add_generation_prompt": False, "continue_final_message": True},
        {"chat_template": template, "documents": docs, "chat_template_kwargs": {"flag": True}},
    ]
    for kw in cases:
        special = kw.pop("add_special_tokens", False)
        r = await ask(svc, messages=messages, add_special_tokens=special if special else None,
                      **kw)
        assert r.token_ids == tok.encode_chat(messages, add_special_tokens=special, **kw), kw
    r = await ask(svc, messages=messages, chat_template=template, documents=docs)
    assert tok.decode(r.token_ids or [], skip_special_tokens=False).startswith("[one]\n[two]\n")


# -------------------------------------------------------------------------------- bad input


async def test_bad_requests_are_4xx(svc: TokenizerService, tok: ModelTokenizer) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert "not served" in await refused(svc, "404", model="nope", prompt="x")
    await refused(svc, "400", prompt="x", block_size=0)
    await refused(svc, "400", prompt="x", messages=msgs)
    await refused(svc, "400")
    assert "out of vocabulary" in await refused(svc, "400", prompt=[1, tok.vocab_size])
    await refused(svc, "400", prompt=[-1])
    await refused(svc, "400", messages=[])
    await refused(svc, "400", messages=[{"role": "narrator", "content": "x"}])
    await refused(svc, "400", messages=[{"content": "x"}])
    await refused(svc, "400", messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    await refused(svc, "400", messages=msgs, continue_final_message=True)
    await refused(svc, "400", messages=msgs, chat_template_kwargs={"tools": []})
    await refused(svc, "400", messages=msgs, chat_template="{% for %}")
    await refused(svc, "400", messages=msgs, chat_template="{{ messages[5].content }}")
    await refused(svc, "400", messages=msgs, chat_template="{{ raise_exception('no') }}")
    await refused(svc, "400", messages=msgs, chat_template="{{ 1 // 0 }}")
    await refused(svc, "400", messages=msgs, tools=[1, 2])  # type: ignore[list-item]
    await refused(svc, "400", messages=msgs, documents=[{"a": 1}],
                  chat_template="{{ documents | map(attribute='x.y.z') | join }}{{ 'a' < 1 }}")
    await refused(svc, "400", prompt="bad \ud800 surrogate")
    # The service keeps answering after all of that.
    assert (await ask(svc, prompt="fine")).token_ids == tok.encode("fine")
    errors = generate_latest(svc.metrics.registry).decode()
    assert 'infermesh_tokenizer_errors_total{code="400"}' in errors
    assert 'infermesh_tokenizer_errors_total{code="404"} 1.0' in errors


async def test_request_chat_templates_can_be_refused(model_dir: Path) -> None:
    s = TokenizerService(TokenizerConfig(models=[f"{MODEL}={model_dir}"],
                                         trust_request_chat_template=False))
    s.load_models()
    msgs = [{"role": "user", "content": "hi"}]
    assert "trust_request_chat_template" in await refused(s, "400", messages=msgs,
                                                          chat_template="{{ 1 }}")
    assert (await ask(s, messages=msgs)).num_tokens > 0


# ---------------------------------------------------------------------------- config, metrics


async def test_several_models_and_metrics(model_dir: Path, tok: ModelTokenizer) -> None:
    s = TokenizerService(TokenizerConfig(models=[f"a={model_dir}", f"b={model_dir}"]))
    s.load_models()
    ra = await ask(s, model="a", prompt="x " * 40)
    rb = await ask(s, model="b", prompt="x " * 40)
    assert ra.token_ids == rb.token_ids and ra.block_keys != rb.block_keys  # keys seeded by name
    assert rb.block_keys == prompt_keys("b", tok.encode("x " * 40), 16)
    await ask(s, model="a", prompt="x " * 40)
    text = generate_latest(s.metrics.registry).decode()
    for line in ('infermesh_tokenizer_requests_total{kind="text",model="a"} 2.0',
                 'infermesh_tokenizer_cache_hits_total{cache="prompt"} 1.0',
                 'infermesh_tokenizer_cache_misses_total{cache="prompt"} 2.0',
                 'infermesh_tokenizer_seconds_count{kind="text"} 3.0',
                 'infermesh_tokenizer_encoded_chars_total{model="a"} 80.0',
                 'infermesh_tokenizer_cache_entries{cache="prompt"} 2.0'):
        assert line in text, line


def test_config_models(model_dir: Path) -> None:
    assert TokenizerConfig().model_folders() == {MODEL: None}
    cfg = TokenizerConfig(models=[f"org/m={model_dir}", str(model_dir)])
    assert cfg.model_folders() == {"org/m": model_dir, str(model_dir): model_dir}
    for bad in (["=x"], ["a="], ["a=x", "a=y"]):
        with pytest.raises(ValueError):
            TokenizerConfig(models=bad)
    with pytest.raises(ValueError):
        TokenizerConfig(chunk_chars=0)


def test_config_from_env_and_cli(model_dir: Path) -> None:
    from infermesh.libs.config import load_config
    from infermesh.services.tokenizer.__main__ import main

    args = main.parser().parse_args(["--chunk-chars", "100", "--no-trust-request-chat-template"])
    cfg = load_config(TokenizerConfig, args, env_prefix="INFERMESH_TOKENIZER",
                      env={"INFERMESH_TOKENIZER_MODELS": f"a={model_dir},b={model_dir}",
                           "INFERMESH_TOKENIZER_CHUNK_CHARS": "5"})
    assert cfg.chunk_chars == 100 and not cfg.trust_request_chat_template
    assert list(cfg.model_folders()) == ["a", "b"]


def test_a_bad_model_folder_fails_loudly(tmp_path: Path) -> None:
    from infermesh.services.tokenizer.__main__ import main

    assert main(["--models", f"x={tmp_path}", "--http-port", "-1"]) == 2


# ---------------------------------------------------------------------------- early replies


def early_service(model_dir: Path, **kw: Any) -> TokenizerService:
    kw = {"models": [f"{MODEL}={model_dir}"], "chunk_chars": 256, "offload_chars": 1_000_000,
          "early_reply_chars": 1000, **kw}
    s = TokenizerService(TokenizerConfig(**kw))
    s.load_models()
    return s


def doc_text(seed: int, docs: int) -> str:
    return "\n\n".join(itertools.islice(corpus(seed), docs))


def metric(svc: TokenizerService, line: str) -> float:
    """The value of one exported sample (0 when absent)."""
    for sample in generate_latest(svc.metrics.registry).decode().splitlines():
        if sample.startswith(line + " "):
            return float(sample.rsplit(" ", 1)[1])
    return 0.0


def assert_full(r: TokenizeReply, ids: list[int], bs: int = 16, **kw: Any) -> None:
    assert not r.partial and r.known_tokens is None and r.max_num_tokens is None
    assert r.num_tokens == len(ids) and r.block_keys == prompt_keys(MODEL, ids, bs, **kw)


def assert_partial(r: TokenizeReply, ids: list[int], bs: int = 16, **kw: Any) -> None:
    """A partial reply: the keys of the first blocks, exactly; the count estimated, and
    bounded."""
    assert r.partial and r.known_tokens is not None and r.token_ids is None
    assert r.max_num_tokens is not None
    assert r.known_tokens < len(ids) <= r.max_num_tokens
    assert r.known_tokens < r.num_tokens <= r.max_num_tokens
    assert len(r.block_keys) == r.known_tokens // bs
    assert r.block_keys == prompt_keys(MODEL, ids, bs, **kw)[: len(r.block_keys)]
    assert abs(r.num_tokens - len(ids)) < 0.25 * len(ids), (r.num_tokens, len(ids))


async def test_a_long_unseen_tail_is_answered_early(model_dir: Path, tok: ModelTokenizer) -> None:
    s = early_service(model_dir)
    try:
        doc = doc_text(31, 60)
        # Never seen at all: the keys of the first piece's blocks (tokenized now: seen text may
        # run into the first piece the caches lack), none after.
        r = await ask(s, prompt=doc, return_token_ids=False)
        assert_partial(r, tok.encode(doc))
        ct = s.tokenizers[MODEL]
        first = ct.piecer.split(ct.chunker.split(doc)[0])[0]
        assert r.known_tokens == 1 + len(tok.encode(first, add_special_tokens=False))
        await s.drain()
        # The document seen, a long new part after it: the document's keys, at once (from the
        # key chain of the same variant, or hashed).
        for seed, kw in ((32, {"lora_name": "ad", "cache_salt": "s"}), (42, {})):
            text = doc + "\n\nQuestion:\n" + doc_text(seed, 30)
            ids = tok.encode(text)
            r = await ask(s, prompt=text, return_token_ids=False, **kw)
            assert_partial(r, ids, **kw)
            assert r.known_tokens >= len(tok.encode(doc)) - 1  # up to the document's end
            await s.drain()
        # Tokenized in the background since: the full answer, from the prompt cache or (for
        # a replica whose prompt cache dropped it) the chunk cache, and from the key chain.
        r = await ask(s, prompt=text, return_token_ids=False, lora_name="ad", cache_salt="s")
        assert_full(r, ids, lora_name="ad", cache_salt="s")
        s.prompt_cache.clear()
        ct._recent.clear()  # (a long text is recalled from the last one like it, otherwise)
        hits = s.key_cache.hits
        r = await ask(s, prompt=text, return_token_ids=False)
        assert_full(r, ids)
        assert s.key_cache.hits > hits
        # A new long text after a seen one whose own tail was seen before, too: full.
        s.prompt_cache.clear()
        ct._recent.clear()
        assert_full(await ask(s, prompt=text[: len(text) // 2], return_token_ids=False),
                    tok.encode(text[: len(text) // 2]))
        for line, value in ((f'infermesh_tokenizer_partial_replies_total{{model="{MODEL}"}}', 3),
                            ('infermesh_tokenizer_background_jobs_total{outcome="started"}', 3),
                            ("infermesh_tokenizer_background_running", 0)):
            assert metric(s, line) == value, line
    finally:
        await s.stop()


async def test_an_earlier_prompt_ending_inside_a_chunk_still_matches(
        model_dir: Path, tok: ModelTokenizer) -> None:
    """A conversation's next turn, or a shared prefix shorter than a chunk then a long new part:
    the chunk that holds the earlier prompt's end is new, yet its blocks may be cached."""
    s = early_service(model_dir, chunk_chars=2048, early_reply_chars=2048)
    try:
        earlier = doc_text(43, 6)[:1800]  # one chunk
        assert_full(await ask(s, prompt=earlier, return_token_ids=False), tok.encode(earlier))
        for seed in (44, 45):
            text = earlier + doc_text(seed, 30)
            ids, seen = tok.encode(text), tok.encode(earlier)
            common = next((i for i, (a, b) in enumerate(zip(ids, seen, strict=False)) if a != b),
                          len(seen))
            r = await ask(s, prompt=text, return_token_ids=False)
            assert_partial(r, ids)
            assert len(r.block_keys) >= common // 16  # every block the engine may hold
        await s.drain()
    finally:
        await s.stop()


async def test_when_the_answer_is_always_full(model_dir: Path, tok: ModelTokenizer) -> None:
    doc, new = doc_text(33, 40), doc_text(34, 20)
    s = early_service(model_dir)
    try:
        # Token ids asked for: never partial.
        for text in (doc, doc + new):
            assert (await ask(s, prompt=text)).token_ids == tok.encode(text)
            assert_full(await ask(s, prompt=text, return_token_ids=True), tok.encode(text))
        # A short new tail (up to early_reply_chars): tokenized before the reply.
        for tail in ("\n\nQuestion: why?", "x" * 400, "\n\n" + new[:400]):
            r = await ask(s, prompt=doc + tail, return_token_ids=False)
            assert_full(r, tok.encode(doc + tail))
        # Every chunk seen before (a replica whose prompt cache dropped the text): full.
        s.prompt_cache.clear()
        assert_full(await ask(s, prompt=doc + new, return_token_ids=False), tok.encode(doc + new))
        # Token ids as the prompt: nothing to tokenize.
        assert_full(await ask(s, prompt=list(range(100)), return_token_ids=False),
                    list(range(100)))
        assert metric(s, f'infermesh_tokenizer_partial_replies_total{{model="{MODEL}"}}') == 0
    finally:
        await s.stop()
    # Off (early_reply_chars 0), or without a chunk cache (nothing is known to be unseen).
    for kw in ({"early_reply_chars": 0}, {"chunk_cache_mb": 0}, {"early_reply_jobs": 0}):
        s = early_service(model_dir, **kw)
        try:
            text = doc_text(35, 30)
            assert_full(await ask(s, prompt=text, return_token_ids=False), tok.encode(text))
        finally:
            await s.stop()


async def test_background_jobs_are_bounded_and_shared(model_dir: Path,
                                                      tok: ModelTokenizer) -> None:
    s = early_service(model_dir, early_reply_jobs=1)
    try:
        a, b = doc_text(36, 40), doc_text(37, 40)
        ids_a = tok.encode(a)
        assert_partial(await ask(s, prompt=a, return_token_ids=False), ids_a)  # started
        assert_partial(await ask(s, prompt=a, return_token_ids=False), ids_a)  # joined
        # The background is full: b is tokenized before its reply.
        assert_full(await ask(s, prompt=b, return_token_ids=False), tok.encode(b))
        # Ids of a text being tokenized in the background: waits for it rather than redo it.
        encoded = s.tokenizers[MODEL].encoded_chars
        r = await ask(s, prompt=a)
        assert r.token_ids == ids_a and not r.partial
        assert s.tokenizers[MODEL].encoded_chars == encoded + len(a)
        for outcome, n in (("started", 1), ("joined", 1), ("inlined", 1), ("failed", 0)):
            line = f'infermesh_tokenizer_background_jobs_total{{outcome="{outcome}"}}'
            assert metric(s, line) == n, outcome
        assert metric(s, f'infermesh_tokenizer_partial_replies_total{{model="{MODEL}"}}') == 2
        # A stop cancels what still runs.
        assert_partial(await ask(s, prompt=b + a, return_token_ids=False), tok.encode(b + a))
    finally:
        await s.stop()
    assert not s.core._jobs


async def test_the_count_of_a_partial_reply_is_bounded(model_dir: Path,
                                                       tok: ModelTokenizer) -> None:
    """Whatever the text (scripts, emoji, digits, special tokens, runs without boundaries),
    known_tokens < the true count <= max_num_tokens, and the estimate lies between."""
    s = early_service(model_dir, chunk_chars=64, early_reply_chars=64)
    try:
        tails = ["日本語のテキスト、句読点。" * 40, "🙂👍🏽 " * 100, "1234567890 " * 60,
                 "<|eot_id|>x " * 80, "a" * 3000, "\n\n  \t " * 200, doc_text(46, 10)]
        for i, tail in enumerate(tails):
            for special in (True, False):
                text = doc_text(47 + 2 * i + special, 3) + tail
                r = await ask(s, prompt=text, add_special_tokens=special, return_token_ids=False)
                ids = tok.encode(text, add_special_tokens=special)
                assert r.partial and r.known_tokens is not None and r.max_num_tokens is not None
                assert r.known_tokens < len(ids) <= r.max_num_tokens, (i, special)
                assert r.known_tokens < r.num_tokens <= r.max_num_tokens
                assert r.block_keys == prompt_keys(MODEL, ids, 16)[: r.known_tokens // 16]
                await s.drain()
    finally:
        await s.stop()


async def test_a_chat_is_answered_early(model_dir: Path, tok: ModelTokenizer) -> None:
    s = early_service(model_dir)
    try:
        system = {"role": "system", "content": doc_text(38, 40)}
        first = [system, {"role": "user", "content": "Hi"}]
        r = await ask(s, messages=first)
        assert r.token_ids == tok.encode(tok.render_chat(first), add_special_tokens=False)
        chat = [system, {"role": "user", "content": doc_text(39, 20)}]
        ids = tok.encode(tok.render_chat(chat), add_special_tokens=False)
        r = await ask(s, messages=chat, return_token_ids=False)
        assert_partial(r, ids)
        assert r.known_tokens > len(tok.encode(system["content"])) - 256
        await s.drain()
        assert_full(await ask(s, messages=chat, return_token_ids=False), ids)
    finally:
        await s.stop()


async def test_a_failing_background_tokenization_is_counted(model_dir: Path,
                                                            tok: ModelTokenizer) -> None:
    s = early_service(model_dir)
    try:
        # (A lone surrogate cannot come over the bus: msgpack strings are UTF-8.)
        text = doc_text(40, 30) + " \ud800 " + doc_text(41, 5)
        r = await ask(s, prompt=text, return_token_ids=False)
        assert r.partial
        await s.drain()
        assert metric(s, 'infermesh_tokenizer_background_jobs_total{outcome="failed"}') == 1
        await refused(s, "400", prompt=text)  # asked again in full: the 400 as before
        assert (await ask(s, prompt="fine", return_token_ids=False)).num_tokens > 0
    finally:
        await s.stop()


def test_partial_replies_and_old_peers_understand_each_other() -> None:
    class OldReply(msgspec.Struct, kw_only=True):
        v: int = 1
        num_tokens: int
        block_keys: list[int]
        token_ids: list[int] | None = None

    old = msgspec.msgpack.encode(OldReply(num_tokens=3, block_keys=[7]))
    r = msgspec.msgpack.decode(old, type=TokenizeReply)
    assert (r.num_tokens, r.block_keys, r.partial, r.known_tokens, r.max_num_tokens) == (
        3, [7], False, None, None)
    new = msgspec.msgpack.encode(TokenizeReply(num_tokens=40, block_keys=[1], partial=True,
                                               known_tokens=20, max_num_tokens=90))
    assert msgspec.msgpack.decode(new, type=OldReply).num_tokens == 40
    r = msgspec.msgpack.decode(new, type=TokenizeReply)
    assert (r.partial, r.known_tokens, r.max_num_tokens) == (True, 20, 90)


def test_early_reply_config(model_dir: Path) -> None:
    from infermesh.libs.config import load_config
    from infermesh.services.tokenizer.__main__ import main

    for bad in ({"early_reply_chars": -1}, {"early_reply_jobs": -1}):
        with pytest.raises(ValueError):
            TokenizerConfig(**bad)
    args = main.parser().parse_args(["--early-reply-chars", "0"])
    cfg = load_config(TokenizerConfig, args, env_prefix="INFERMESH_TOKENIZER",
                      env={"INFERMESH_TOKENIZER_EARLY_REPLY_JOBS": "5"})
    assert cfg.early_reply_chars == 0 and cfg.early_reply_jobs == 5
    assert TokenizerConfig().early_reply_chars > 0
