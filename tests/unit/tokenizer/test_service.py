"""The tokenizer's handler without a bus: ids equal the tokenization library (and the
transformers-pinned vectors) for prompts and chats, keys equal kvblock's, bad input is a 4xx."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from nats.micro.request import ServiceError
from prometheus_client import generate_latest

from infermesh.libs.kvblock import prompt_keys
from infermesh.libs.tinymodel import DEFAULT_MODEL_NAME
from infermesh.libs.tinymodel.corpus import corpus
from infermesh.libs.tokenization import ModelTokenizer
from infermesh.proto.messages import TokenizeReply, TokenizeRequest
from infermesh.services.tokenizer.cache import CachingTokenizer
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
    assert svc.prompt_cache.hits == 1 and svc.chunk_cache.hits > 0


async def test_offloaded_tokenization_is_the_same(model_dir: Path, tok: ModelTokenizer) -> None:
    s = TokenizerService(TokenizerConfig(models=[f"{MODEL}={model_dir}"], offload_chars=0,
                                         chunk_chars=64))
    s.load_models()
    ct = s.tokenizers[MODEL]
    threads: list[str] = []

    def run(plan: Any) -> None:
        threads.append(threading.current_thread().name)
        CachingTokenizer.run(ct, plan)

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
