"""Tests for infermesh.libs.tokenization against vectors pinned from transformers.

``tokenizer_vectors.json`` was produced by ``gen_tokenizer_vectors.py`` with the
transformers release vLLM 0.32 uses, following vLLM's chat path (message parsing,
``apply_chat_template``, ``add_special_tokens=False`` for chat and ``True`` for
completions, ``DecodeStream`` for streaming). These tests need no transformers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.nodes
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infermesh.libs.tinymodel import CHAT_TEMPLATE, build_model_folder
from infermesh.libs.tokenization import (
    ChatTemplateError,
    IncrementalDetokenizer,
    ModelTokenizer,
    TokenizationError,
    compile_template,
    flatten_content,
    make_environment,
    normalize_messages,
)

VECTORS: dict[str, Any] = json.loads(
    Path(__file__).with_name("tokenizer_vectors.json").read_text(encoding="utf-8")
)
CHAT_OPTIONS = ("tools", "chat_template_kwargs", "add_generation_prompt", "continue_final_message")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("tok") / "model")


@pytest.fixture(scope="module")
def tok(folder: Path) -> ModelTokenizer:
    return ModelTokenizer.from_folder(folder)


def _chat_kwargs(case: dict[str, Any]) -> dict[str, Any]:
    return {key: case[key] for key in CHAT_OPTIONS if key in case}


# ----------------------------------------------------------------------------- pinned vectors


def test_vectors_match_this_model(folder: Path) -> None:
    for name, digest in VECTORS["files_sha256"].items():
        actual = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert actual == digest, f"{name} differs from the one the vectors were made with"


def test_properties_match_transformers(tok: ModelTokenizer) -> None:
    assert tok.bos_token_id == VECTORS["bos_token_id"]
    assert tok.eos_token_id == VECTORS["eos_token_id"]
    assert tok.vocab_size == VECTORS["len_tokenizer"] == 4096
    assert tok.special_tokens == VECTORS["special_tokens_map"]
    assert tok.max_model_len == 4096
    assert tok.stop_token_ids[0] == tok.eos_token_id
    assert set(tok.stop_token_ids) == {
        tok.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")
    }
    assert tok.id_to_token(tok.bos_token_id) == "<|begin_of_text|>"


@pytest.mark.parametrize("case", VECTORS["encode"], ids=lambda c: repr(c["text"][:24]))
def test_encode_decode_match_transformers(tok: ModelTokenizer, case: dict[str, Any]) -> None:
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.encode(case["text"], add_special_tokens=True) == case["ids"]
    assert tok.encode(case["text"], add_special_tokens=False) == case["ids_no_special"]
    assert tok.decode(case["ids"]) == case["decoded"]
    assert tok.decode(case["ids"], skip_special_tokens=False) == case["decoded_with_special"]


def test_encode_batch(tok: ModelTokenizer) -> None:
    texts = [case["text"] for case in VECTORS["encode"]]
    assert tok.encode_batch(texts) == [case["ids"] for case in VECTORS["encode"]]
    assert tok.encode_batch(texts, add_special_tokens=False) == [
        case["ids_no_special"] for case in VECTORS["encode"]
    ]


@pytest.mark.parametrize("case", VECTORS["chat"], ids=lambda c: c["name"])
def test_chat_matches_transformers(tok: ModelTokenizer, case: dict[str, Any]) -> None:
    kwargs = _chat_kwargs(case)
    assert tok.render_chat(case["messages"], **kwargs) == case["prompt"]
    assert tok.encode_chat(case["messages"], **kwargs) == case["ids"]


@pytest.mark.parametrize("case", VECTORS["stream"], ids=lambda c: repr(c["output"][:16]))
def test_streaming_matches_vllm(tok: ModelTokenizer, case: dict[str, Any]) -> None:
    deltas = tok.stream_decode(case["output_ids"], prompt_ids=case["prompt_ids"])
    assert deltas == case["deltas"]
    assert "".join(deltas) == case["text"]


@pytest.mark.parametrize("case", VECTORS["stream"], ids=lambda c: repr(c["output"][:16]))
def test_fallback_detokenizer(tok: ModelTokenizer, case: dict[str, Any]) -> None:
    detok = IncrementalDetokenizer(tok.backend, case["prompt_ids"], use_decode_stream=False)
    assert not detok.uses_decode_stream
    deltas = list(detok.feed(case["output_ids"]))
    assert "".join(deltas) == detok.text == case["text"]
    assert all("\ufffd" not in d for d in deltas)
    assert detok.token_ids == case["output_ids"]


@pytest.mark.parametrize("case", VECTORS["chat_errors"], ids=lambda c: c["name"])
def test_chat_errors_match_transformers(tok: ModelTokenizer, case: dict[str, Any]) -> None:
    with pytest.raises(ChatTemplateError):
        tok.render_chat(case["messages"])


# ----------------------------------------------------------------------------- properties


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_round_trip_any_text(tok: ModelTokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode(text) == [tok.bos_token_id, *ids]
    deltas = tok.stream_decode(ids, prompt_ids=[tok.bos_token_id])
    assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


def test_streaming_never_splits_characters(tok: ModelTokenizer) -> None:
    text = "👨‍👩‍👧‍👦🇯🇵日本語é" * 3
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 2  # multi-byte characters span several tokens
    detok = tok.detokenizer()
    assert detok.uses_decode_stream
    pieces = [detok.step(i) for i in ids]
    assert "".join(pieces) == text
    assert "" in pieces and all("\ufffd" not in p for p in pieces)


def test_streaming_skips_special_tokens_by_default(tok: ModelTokenizer) -> None:
    ids = tok.encode("Hi<|eot_id|>", add_special_tokens=False)
    assert "".join(tok.stream_decode(ids)) == "Hi"
    assert "".join(tok.stream_decode(ids, skip_special_tokens=False)) == "Hi<|eot_id|>"


# ----------------------------------------------------------------------------- chat details


def test_template_is_string_content_format() -> None:
    """vLLM treats templates that never loop over message content as "string" ones."""
    ast = make_environment().parse(CHAT_TEMPLATE)
    for loop in ast.find_all(jinja2.nodes.For):
        for node in loop.iter.find_all((jinja2.nodes.Getitem, jinja2.nodes.Getattr)):
            key = getattr(node, "attr", None) or getattr(getattr(node, "arg", None), "value", None)
            assert key != "content", "a loop over message content makes vLLM use 'openai' format"


def test_flatten_content() -> None:
    assert flatten_content(None) == ""
    assert flatten_content("plain") == "plain"
    parts = [{"type": "text", "text": "a"}, "b", {"type": "text", "text": None},
             {"type": "refusal", "refusal": "c"}, {"type": "input_text", "text": "d"}]
    assert flatten_content(parts) == "a\nb\nc\nd"
    assert flatten_content([]) == ""


def test_normalize_messages_keeps_only_vllm_fields() -> None:
    conversation = normalize_messages(
        [
            {"role": "user", "content": "q", "extra": 1, "name": "ann"},
            {"role": "assistant", "content": None, "reasoning_content": "r",
             "tool_calls": [{"id": "1", "type": "function",
                             "function": {"name": "f", "arguments": '{"a": 1}'}}]},
            {"role": "tool", "tool_call_id": "1", "content": "ok", "name": 5},
            {"role": "developer", "content": "d"},
        ]
    )
    assert conversation == [
        {"role": "user", "content": "q", "name": "ann"},
        {"role": "assistant", "content": "", "reasoning": "r", "reasoning_content": "r",
         "tool_calls": [{"id": "1", "type": "function",
                         "function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": "ok", "tool_call_id": "1"},
        {"role": "developer", "content": "d", "tools": None},
    ]


def test_normalize_does_not_mutate_input(tok: ModelTokenizer) -> None:
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "1", "type": "function",
                         "function": {"name": "f", "arguments": "{}"}}]},
    ]
    before = json.dumps(messages)
    tok.render_chat(messages)
    assert json.dumps(messages) == before


@pytest.mark.parametrize(
    ("messages", "kwargs", "match"),
    [
        ([], {}, "at least one"),
        ("hello", {}, "list"),
        ([{"content": "no role"}], {}, "role"),
        (["not an object"], {}, "object"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {},
         "image_url"),
        ([{"role": "user", "content": [{"text": "no type"}]}], {}, "type"),
        ([{"role": "user", "content": {"type": "text"}}], {}, "string or a list"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], {}, "string"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}], {}, "function"),
        ([{"role": "assistant", "content": "", "tool_calls": "nope"}], {}, "list"),
        ([{"role": "user", "content": "x"}], {"continue_final_message": True}, "both"),
        ([{"role": "user", "content": "x"}], {"chat_template_kwargs": {"tokenize": True}},
         "tokenize"),
        ([{"role": "user", "content": "x"}], {"chat_template_kwargs": {"chat_template": "x"}},
         "chat_template"),
        ([{"role": "user", "content": "x"}], {"tools": "nope"}, "tools"),
        ([{"role": "user", "content": "x"}], {"tools": ["nope"]}, "tool"),
        ([{"role": "user", "content": "x"}], {"documents": "nope"}, "documents"),
        ([{"role": "robot", "content": "x"}], {}, "robot"),
    ],
)
def test_chat_validation_errors(
    tok: ModelTokenizer, messages: Any, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        tok.encode_chat(messages, **kwargs)


def test_errors_are_value_errors() -> None:
    assert issubclass(ChatTemplateError, TokenizationError)
    assert issubclass(TokenizationError, ValueError)


def test_continue_final_message(tok: ModelTokenizer) -> None:
    text = tok.render_chat(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello the"}],
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nHello the")


def test_tools_render_name_description_parameters(tok: ModelTokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Find <b>ü</b>",
                                               "parameters": {"type": "object"}}},
             {"name": "bare", "parameters": None}]
    text = tok.render_chat([{"role": "user", "content": "x"}], tools=tools)
    expected = 'Function: lookup\nDescription: Find <b>ü</b>\nParameters: {"type": "object"}\n'
    assert expected in text
    assert "Function: bare\n\n" in text


def test_custom_template_and_kwargs(tok: ModelTokenizer) -> None:
    template = (
        "{% for m in messages %}[{{ m.role }}|{{ m.content }}]{% endfor %}"
        "{% if flavour is defined %}<{{ flavour }}>{% endif %}"
        "{% if add_generation_prompt %}>>{% endif %}{{ eos_token }}"
    )
    text = tok.render_chat(
        [{"role": "user", "content": "a"}],
        chat_template=template,
        chat_template_kwargs={"flavour": "mint", "unused": 1},
    )
    assert text == "[user|a]<mint>>><|eot_id|>"
    assert compile_template(template) is compile_template(template)


def test_environment_matches_transformers_options(tok: ModelTokenizer) -> None:
    env = make_environment()
    assert env.trim_blocks and env.lstrip_blocks
    assert env.from_string('{{ {"a": "<é>"} | tojson }}').render() == '{"a": "<é>"}'
    assert env.from_string("{{ [1, 2] | tojson(indent=2) }}").render() == "[\n  1,\n  2\n]"
    assert env.from_string("{{ {'b': 1, 'a': 2} | tojson(sort_keys=True) }}").render() == (
        '{"a": 2, "b": 1}'
    )
    assert len(env.from_string("{{ strftime_now('%Y') }}").render()) == 4
    loop = "{% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
    assert env.from_string(loop).render() == "1"
    assert env.from_string("{% generation %}gen{% endgeneration %}").render() == "gen"
    block = "  {% if true %}\nx\n  {% endif %}\ny"
    assert env.from_string(block).render() == "x\ny"
    with pytest.raises(jinja2.TemplateError, match="boom"):
        env.from_string("{{ raise_exception('boom') }}").render()
    with pytest.raises(jinja2.exceptions.SecurityError):
        env.from_string("{{ ''.__class__.__mro__ }}").render()


def test_bad_templates(tok: ModelTokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="invalid chat template"):
        tok.render_chat([{"role": "user", "content": "x"}], chat_template="{% if %}")
    with pytest.raises(ChatTemplateError, match="nope"):
        tok.render_chat([{"role": "user", "content": "x"}],
                        chat_template="{{ raise_exception('nope') }}")


def test_template_compiled_once(tok: ModelTokenizer) -> None:
    assert tok._compiled is compile_template(CHAT_TEMPLATE)


# ----------------------------------------------------------------------------- input errors


def test_encode_rejects_bad_text(tok: ModelTokenizer) -> None:
    with pytest.raises(TokenizationError):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TokenizationError):
        tok.encode("lone \ud800 surrogate")
    with pytest.raises(TokenizationError):
        tok.encode_batch(["ok", None])  # type: ignore[list-item]


def test_decode_rejects_bad_ids(tok: ModelTokenizer) -> None:
    with pytest.raises(TokenizationError, match="out of range"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(TokenizationError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(TokenizationError, match="integers"):
        tok.decode([1.5])  # type: ignore[list-item]
    with pytest.raises(TokenizationError, match="integers"):
        tok.decode([True])


def test_from_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizationError, match="tokenizer.json"):
        ModelTokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizationError):
        ModelTokenizer.from_folder(tmp_path)


def test_no_chat_template(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    plain = ModelTokenizer.from_folder(tmp_path, max_model_len=128)
    assert plain.max_model_len == 128
    assert plain.bos_token_id is None and plain.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        plain.render_chat([{"role": "user", "content": "x"}])
