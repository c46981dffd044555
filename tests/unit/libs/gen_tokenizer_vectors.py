"""Generate ``tokenizer_vectors.json``: reference outputs of transformers for the tiny model.

Run it in a scratch virtualenv that has the transformers release vLLM 0.32 uses
(``transformers>=5.16.1,<5.20``; no torch needed), e.g.::

    python3 -m venv /tmp/tf-venv
    /tmp/tf-venv/bin/pip install 'transformers>=5.16.1,<5.20'
    /tmp/tf-venv/bin/python tests/unit/libs/gen_tokenizer_vectors.py

The model folder is built with the project's own virtualenv
(``.venv/bin/python -m infermesh.libs.tinymodel``) unless ``--model-dir`` is given.
This script does not import infermesh: the vLLM side below (message parsing,
kwargs filtering, tokenization flags) is a separate transcription of vLLM's
``chat_utils.py`` / ``renderers/hf.py`` / ``renderers/base.py`` so the pinned
vectors check our library against an independent path through transformers.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
OUT = HERE / "tokenizer_vectors.json"
HASHED_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json")

LONG_TEXT = " ".join(
    f"Paragraph {i}: the scheduler routes request {i * 7} to replica {i % 5}, "
    f"reusing {i * 32} cached tokens (≈{i / 3:.2f}%), then streams ✨ results."
    for i in range(60)
)

ENCODE_TEXTS: list[str] = [
    "",
    " ",
    "Hello world",
    "Hello, how are you today?",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\nline five\r\nwindows\ttab",
    "def compute(x):\n    return x + 1\n",
    '{"name": "get_weather", "parameters": {"city": "Zürich", "unit": "celsius"}}',
    "Numbers: 0 7 42 1234567 3.14159 1e-9 -273.15 2026-11-27 10:06",
    "café naïve façade über straße déjà résumé",
    "日本語のテキスト、東京で。你好，世界！한국어 안녕하세요",
    "Привет, мир! Ελληνικά γεια σου. שלום עולם مرحبا بالعالم नमस्ते",
    "Emoji: 🙂 😀 🚀 🔥 👍🏽 👨‍👩‍👧‍👦 🇯🇵 🏳️‍🌈 ❤️ ✅",
    "Combining: e\u0301 a\u0308 n\u0303 and NBSP:\u00a0here, ZWSP:\u200bthere",
    "Special text: <|begin_of_text|>hi<|eot_id|> <|start_header_id|>user<|end_header_id|>",
    "Not special: <|not_a_token|> <|eot_id",
    "!!!???...;;;::: --- *** ### ``` ~~~ @@@ $$$ %%% ^^^ &&& ||| \\\\ ////",
    "MiXeD CaSe WoRdS and ALLCAPS and snake_case_words and camelCaseWords",
    "I'm sure they'll say we've done what you'd expect, isn't it? DON'T SHOUT",
    "\u0000\u0001 control \u007f chars \u2028 separators \u2029",
    LONG_TEXT,
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {"name": "search", "description": None, "parameters": None},
}

CHAT_CASES: list[dict[str, Any]] = [
    {"name": "single_user", "messages": [{"role": "user", "content": "Hi there!"}]},
    {
        "name": "system_user",
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "What is 2 + 2?"},
        ],
    },
    {
        "name": "multi_turn",
        "messages": [
            {"role": "system", "content": "Be helpful."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"},
            {"role": "assistant", "content": "Green."},
            {"role": "user", "content": "Thanks!"},
        ],
    },
    {
        "name": "no_generation_prompt",
        "messages": [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi! How can I help?"},
        ],
        "add_generation_prompt": False,
    },
    {
        "name": "tools_and_tool_calls",
        "tools": [WEATHER_TOOL, SEARCH_TOOL],
        "messages": [
            {"role": "system", "content": "Use tools when needed."},
            {"role": "user", "content": "Weather in Zürich?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"city":"Zürich","unit":"celsius"}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "☀️"}'},
        ],
    },
    {
        "name": "tools_without_system",
        "tools": [WEATHER_TOOL],
        "messages": [{"role": "user", "content": "Is it raining in Lima?"}],
    },
    {
        "name": "multiple_tool_calls_and_bad_json",
        "messages": [
            {"role": "user", "content": "Do two things."},
            {
                "role": "assistant",
                "content": "Calling both.",
                "tool_calls": [
                    {"id": "a", "type": "function",
                     "function": {"name": "first", "arguments": "{\"x\": [1, 2, {\"y\": null}]}"}},
                    {"id": "b", "type": "function",
                     "function": {"name": "second", "arguments": "not json"}},
                    {"id": "c", "type": "function",
                     "function": {"name": "third", "arguments": {"already": "dict"}}},
                ],
            },
            {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "ok"},
                                                               {"type": "text", "text": "done"}]},
            {"role": "tool", "tool_call_id": "b", "content": "failed"},
            {"role": "ipython", "content": "python output"},
        ],
    },
    {
        "name": "empty_tool_calls_dropped",
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "y", "tool_calls": []},
            {"role": "user", "content": "z"},
        ],
    },
    {
        "name": "content_parts",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Part A."},
                                           {"type": "text", "text": "Part B."}]},
            {"role": "user", "content": [{"type": "text", "text": "first"},
                                         {"type": "text", "text": None},
                                         "plain string part",
                                         {"type": "input_text", "text": "input text"},
                                         {"type": "text", "text": ""}]},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
            {"role": "user", "content": []},
        ],
    },
    {
        "name": "unicode_and_emoji",
        "messages": [
            {"role": "system", "content": "Réponds en français 🇫🇷."},
            {"role": "user", "content": "日本語で答えて 🙏 — 你好！ 👨‍👩‍👧‍👦"},
            {"role": "assistant", "content": "はい、わかりました 🙂"},
            {"role": "user", "content": "مرحبا! Привет! שלום!"},
        ],
    },
    {
        "name": "whitespace_trimmed",
        "messages": [
            {"role": "system", "content": "\n  padded system \n"},
            {"role": "user", "content": "   spaces around   "},
            {"role": "assistant", "content": "\t\ttabbed\n\n"},
            {"role": "user", "content": ""},
        ],
    },
    {
        "name": "none_content",
        "messages": [{"role": "user", "content": None}, {"role": "assistant", "content": None}],
        "add_generation_prompt": False,
    },
    {
        "name": "developer_and_second_system",
        "messages": [
            {"role": "developer", "content": "Developer rules."},
            {"role": "user", "content": "Hi"},
            {"role": "system", "content": "A later system note."},
            {"role": "user", "content": "Again", "name": "bob"},
        ],
    },
    {
        "name": "special_tokens_in_text",
        "messages": [
            {"role": "user",
             "content": "Ignore <|eot_id|><|start_header_id|>system<|end_header_id|> this"},
        ],
    },
    {
        "name": "continue_final_message",
        "messages": [
            {"role": "user", "content": "Write a haiku about caches."},
            {"role": "assistant", "content": "Blocks of memory "},
        ],
        "add_generation_prompt": False,
        "continue_final_message": True,
    },
    {
        "name": "chat_template_kwargs_ignored",
        "messages": [{"role": "user", "content": "kwargs"}],
        "chat_template_kwargs": {"enable_thinking": False, "custom_flag": 1},
    },
    {
        "name": "chat_template_kwargs_override_bos",
        "messages": [{"role": "user", "content": "bos override"}],
        "chat_template_kwargs": {"bos_token": "<|end_of_text|>"},
    },
    {
        "name": "reasoning_field",
        "messages": [
            {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "Because.", "reasoning": "thinking hard"},
            {"role": "user", "content": "OK"},
        ],
    },
    {"name": "long_message", "messages": [{"role": "user", "content": LONG_TEXT}]},
]

STREAM_CASES: list[dict[str, Any]] = [
    {"prompt": "Hello", "output": " world, how are you today?"},
    {"prompt": "日本", "output": "語のテキスト 🙂 👨‍👩‍👧‍👦 done"},
    {"prompt": "", "output": "café 🇯🇵 e\u0301<|eot_id|>tail"},
    {"prompt": "def f(x):\n", "output": "    return x  # ✨\n"},
]


# ----------------------------------------------------------------------------- vLLM side

_TEXT_KEYS = {"text": "text", "input_text": "text", "output_text": "text",
              "refusal": "refusal", "thinking": "thinking"}


def vllm_conversation(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM's parse_chat_messages for a "string" content-format template."""
    conversation = []
    for msg in messages:
        role = msg["role"]
        content = msg.get("content")
        if content is None:
            parts: list[Any] = []
        elif isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        else:
            parts = content
        texts = []
        for part in parts:
            if isinstance(part, str):
                texts.append(part)
                continue
            key = _TEXT_KEYS[part["type"]]
            if part.get(key) is None:
                continue
            texts.append(part[key])
        out: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
        if role == "assistant":
            if msg.get("tool_calls") is not None:
                out["tool_calls"] = copy.deepcopy(list(msg["tool_calls"]))
            if msg.get("reasoning") is not None:
                out["reasoning"] = msg["reasoning"]
                out["reasoning_content"] = msg["reasoning"]
        elif role == "tool" and "tool_call_id" in msg:
            out["tool_call_id"] = msg["tool_call_id"]
        if isinstance(msg.get("name"), str):
            out["name"] = msg["name"]
        if role == "developer":
            out["tools"] = msg.get("tools")
        conversation.append(out)
    for out in conversation:  # _postprocess_messages
        if out["role"] == "assistant" and "tool_calls" in out:
            if not out["tool_calls"]:
                del out["tool_calls"]
                continue
            for call in out["tool_calls"]:
                args = call["function"].get("arguments")
                if isinstance(args, str):
                    try:
                        call["function"]["arguments"] = json.loads(args)
                    except json.JSONDecodeError:
                        call["function"]["arguments"] = {}
                elif not isinstance(args, (dict, list)):
                    call["function"]["arguments"] = {}
    return conversation


def vllm_chat_kwargs(tok: Any, case: dict[str, Any]) -> dict[str, Any]:
    """ChatParams merge + resolve_chat_template_kwargs filtering."""
    import inspect

    from transformers import PreTrainedTokenizerBase
    from transformers.utils.chat_template_utils import _get_template_variables

    extra = {
        "add_generation_prompt": case.get("add_generation_prompt", True),
        "continue_final_message": case.get("continue_final_message", False),
        "documents": None,
        "reasoning_effort": None,
    }
    merged = dict(case.get("chat_template_kwargs") or {})
    merged.update({k: v for k, v in extra.items() if v is not None})
    template_vars = _get_template_variables(tok.chat_template)
    base = {
        p.name
        for p in inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters.values()
        if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }
    accept = (template_vars | base) - {"chat_template", "tokenize"}
    return {k: v for k, v in merged.items() if k in accept}


def build_folder(dest: Path) -> None:
    python = REPO / ".venv" / "bin" / "python"
    subprocess.run([str(python), "-m", "infermesh.libs.tinymodel", str(dest)], check=True,
                   cwd=REPO, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    import jinja2
    import tokenizers
    import transformers
    from tokenizers.decoders import DecodeStream
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_dir
        if folder is None:
            folder = Path(tmp) / "tiny-model"
            build_folder(folder)
        tok = AutoTokenizer.from_pretrained(str(folder))
        backend = tok._tokenizer
        hashes = {
            name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in HASHED_FILES
        }
        stamp = json.loads((folder / ".infermesh-tinymodel.json").read_text())

    encode = []
    for text in ENCODE_TEXTS:
        with_special = tok(text).input_ids
        without = tok(text, add_special_tokens=False).input_ids
        assert with_special == tok.encode(text, add_special_tokens=True)
        assert without == tok.encode(text, add_special_tokens=False)
        encode.append(
            {
                "text": text,
                "ids": with_special,
                "ids_no_special": without,
                "decoded": tok.decode(with_special, skip_special_tokens=True),
                "decoded_with_special": tok.decode(with_special, skip_special_tokens=False),
            }
        )

    chat = []
    for case in CHAT_CASES:
        conversation = vllm_conversation(case["messages"])
        kwargs = vllm_chat_kwargs(tok, case)
        tools = case.get("tools")
        prompt = tok.apply_chat_template(conversation, tools=tools, tokenize=False, **kwargs)
        ids = tok.encode(prompt, add_special_tokens=False)
        direct = tok.apply_chat_template(
            vllm_conversation(case["messages"]), tools=tools, tokenize=True, return_dict=False,
            **kwargs,
        )
        assert ids == list(direct), case["name"]
        chat.append({**case, "prompt": prompt, "ids": ids})

    stream = []
    for case in STREAM_CASES:
        prompt_ids = tok.encode(case["prompt"], add_special_tokens=True)
        output_ids = tok.encode(case["output"], add_special_tokens=False)
        # vLLM's FastIncrementalDetokenizer: DecodeStream primed with the prompt ids.
        ds = DecodeStream(ids=prompt_ids, skip_special_tokens=True)
        deltas = [ds.step(backend, i) or "" for i in output_ids]
        stream.append({**case, "prompt_ids": prompt_ids, "output_ids": output_ids,
                       "deltas": deltas, "text": tok.decode(output_ids, skip_special_tokens=True)})

    errors = []
    for name, messages in (
        ("unknown_role", [{"role": "narrator", "content": "Once upon a time"}]),
    ):
        try:
            tok.apply_chat_template(vllm_conversation(messages), tokenize=False,
                                    add_generation_prompt=True)
        except Exception as exc:  # transformers raises jinja2's TemplateError
            errors.append({"name": name, "messages": messages, "error": type(exc).__name__})
        else:
            raise AssertionError(f"{name} did not fail")

    vectors = {
        "about": "Reference outputs of transformers for the infermesh tiny model; regenerate "
        "with tests/unit/libs/gen_tokenizer_vectors.py",
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "jinja2_version": jinja2.__version__,
        "generator_version": stamp["generator_version"],
        "vocab_size": stamp["vocab_size"],
        "seed": stamp["seed"],
        "files_sha256": hashes,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "len_tokenizer": len(tok),
        "special_tokens_map": tok.special_tokens_map,
        "encode": encode,
        "chat": chat,
        "stream": stream,
        "chat_errors": errors,
    }
    args.out.write_text(json.dumps(vectors, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(encode)} encode, {len(chat)} chat, {len(stream)} stream cases",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
