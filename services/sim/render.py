"""vLLM 0.32's render endpoints: a generation request turned into the engine's input.

``POST /v1/completions/render`` and ``POST /v1/chat/completions/render``
(``entrypoints/scale_out/render/api_router.py`` and ``.../render/serving.py``, served by
``vllm serve --enable-scale-out``) take the body of ``/v1/completions`` or
``/v1/chat/completions``, check it the same way, tokenize the prompt and answer with the
``GenerateRequest`` the engine would get (``entrypoints/scale_out/token_in_token_out/
protocol.py``): a list of them for completions (one per prompt), one object for chat.
Nothing is generated.

``sampling_params`` is vLLM's ``SamplingParams`` as its pydantic serializer dumps it:
``msgspec.to_builtins`` with ``omit_defaults=True``, private fields dropped. msgspec compares
ints, bools, None and containers with the field default by value and floats by identity,
so the penalties, ``temperature``, ``top_p`` and ``min_p`` (new float objects, set by the
request's ``to_sampling_params``) are always present, while ``top_p`` and ``min_p`` reset
to their defaults by greedy sampling are not. Fields follow ``SamplingParams``' order.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .encoding import to_json
from .errors import invalid_request
from .requests import ChatCompletionRequest, CompletionRequest, GenerationRequest
from .validation import resolve_max_tokens, structured_outputs

__all__ = [
    "generate_request",
    "generation_defaults",
    "render_body",
    "sampling_params",
]

#: ``to_sampling_params``' fallbacks when neither the request nor the model sets a value.
_OPENAI_DEFAULTS: dict[str, float | int] = {
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
}
#: ``generation_config.json`` keys vLLM takes as the model's default sampling parameters.
_GENERATION_KEYS = (
    "repetition_penalty", "presence_penalty", "frequency_penalty", "temperature", "top_k",
    "top_p", "min_p", "max_new_tokens",
)
_SAMPLING_EPS = 1e-5  # below this temperature vLLM samples greedily
_MAX_TEMP = 1e-2  # smaller positive temperatures are raised to this
_DEFAULT_MAX_TOKENS = 16  # SamplingParams.max_tokens' default, omitted when equal
_OUTPUT_KIND_DELTA = 1  # RequestOutputKind.DELTA (streamed)
_OUTPUT_KIND_FINAL_ONLY = 2  # RequestOutputKind.FINAL_ONLY


def generation_defaults(model_dir: Path) -> dict[str, Any]:
    """The model's default sampling parameters, as vLLM's ``get_diff_sampling_param()``
    reads them from ``generation_config.json`` (``max_new_tokens`` becomes ``max_tokens``)."""
    try:
        config = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    found = {k: config[k] for k in _GENERATION_KEYS if config.get(k) is not None}
    if "max_new_tokens" in found:
        found["max_tokens"] = found.pop("max_new_tokens")
    return found


def _logit_bias(bias: Mapping[str, float]) -> dict[str, float]:
    """Token ids as keys, biases clamped to [-100, 100] (``SamplingParams.from_optional``)."""
    out: dict[str, float] = {}
    bad: list[str] = []
    for token, value in bias.items():
        try:
            key = int(token)
        except (TypeError, ValueError):
            bad.append(token)
            continue
        out[str(key)] = min(100.0, max(-100.0, value))
    if bad:
        raise invalid_request("logit_bias contains key(s) that cannot be converted to integer "
                              f"token IDs: {bad!r}", "logit_bias", bad)
    return out


def _logprobs(request: GenerationRequest) -> tuple[int | None, int | None]:
    """``(logprobs, prompt_logprobs)`` as ``to_sampling_params`` passes them."""
    top: int | None
    if isinstance(request, ChatCompletionRequest):
        top = request.top_logprobs
        logprobs = top if request.logprobs and not request.logprob_token_ids else None
    else:
        top = request.logprobs
        logprobs = None if request.logprob_token_ids else request.logprobs
    prompt = request.prompt_logprobs
    if prompt is None and request.echo:
        prompt = top
    if logprobs is True:
        logprobs = 1
    return logprobs, prompt


def _extra_args(request: GenerationRequest) -> dict[str, Any] | None:
    extra: dict[str, Any] = dict(request.vllm_xargs or {})
    if request.kv_transfer_params:
        extra["kv_transfer_params"] = request.kv_transfer_params
    if request.ec_transfer_params:
        extra["ec_transfer_params"] = request.ec_transfer_params
    return extra or None


def _structured(request: GenerationRequest) -> dict[str, Any] | None:
    params = structured_outputs(request)
    if params is None:
        return None
    # msgspec dumps a dataclass whole, private fields included.
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


def _penalties(request: GenerationRequest, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The seven values the request, else the model, else OpenAI's defaults give."""
    out: dict[str, Any] = {}
    for name, fallback in _OPENAI_DEFAULTS.items():
        value = getattr(request, name)
        out[name] = value if value is not None else defaults.get(name, fallback)
    return out


def sampling_params(request: GenerationRequest, max_tokens: int,
                    defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The request's ``SamplingParams``, dumped as vLLM's render endpoints dump them.

    Raises :class:`~.errors.RequestError` for what ``SamplingParams`` refuses beyond
    the checks :func:`~.validation.decode_request` made (greedy sampling with ``n > 1``,
    a ``logit_bias`` key that is not a token id).
    """
    n = 1 if request.n is None else request.n
    base = _penalties(request, defaults)
    temperature = float(base["temperature"])
    if 0 < temperature < _MAX_TEMP:
        temperature = _MAX_TEMP
    greedy = temperature < _SAMPLING_EPS
    if greedy and n > 1:
        raise invalid_request(f"n must be 1 when using greedy sampling, got {n}.")
    logprobs, prompt_logprobs = _logprobs(request)
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    out: dict[str, Any] = {}
    if n != 1:
        out["n"] = n
    out["presence_penalty"] = float(base["presence_penalty"])
    out["frequency_penalty"] = float(base["frequency_penalty"])
    out["repetition_penalty"] = float(base["repetition_penalty"])
    out["temperature"] = temperature
    if request.watermarking is not None:
        out["watermarking"] = request.watermarking
    if not greedy:
        out["top_p"] = float(base["top_p"])
        if base["top_k"] != 0:
            out["top_k"] = base["top_k"]
        out["min_p"] = float(base["min_p"])
    if request.seed is not None and request.seed != -1:
        out["seed"] = request.seed
    out["stop"] = stop
    out["stop_token_ids"] = list(dict.fromkeys(request.stop_token_ids or []))
    _put(out, "ignore_eos", request.ignore_eos, False)
    _put(out, "max_tokens", max_tokens, _DEFAULT_MAX_TOKENS)
    _put(out, "min_tokens", request.min_tokens, 0)
    _put(out, "logprobs", logprobs, None)
    _put(out, "prompt_logprobs", prompt_logprobs, None)
    _put(out, "logprob_token_ids", request.logprob_token_ids or None, None)
    _put(out, "skip_special_tokens", request.skip_special_tokens, True)
    _put(out, "spaces_between_special_tokens", request.spaces_between_special_tokens, True)
    _put(out, "include_stop_str_in_output", request.include_stop_str_in_output, False)
    out["output_kind"] = _OUTPUT_KIND_DELTA if request.stream else _OUTPUT_KIND_FINAL_ONLY
    _put(out, "stream_interval", request.stream_interval, None)
    out["skip_clone"] = True
    if stop and not request.include_stop_str_in_output:
        _put(out, "output_text_buffer_length", max(len(s) for s in stop) - 1, 0)
    _put(out, "structured_outputs", _structured(request), None)
    if request.logit_bias is not None:
        out["logit_bias"] = _logit_bias(request.logit_bias)
    _put(out, "allowed_token_ids", request.allowed_token_ids, None)
    _put(out, "extra_args", _extra_args(request), None)
    out["bad_words"] = list(dict.fromkeys(request.bad_words or []))
    out["skip_reading_prefix_cache"] = prompt_logprobs is not None
    budget = request.thinking_token_budget
    _put(out, "thinking_token_budget", None if budget == -1 else budget, None)
    if request.repetition_detection is not None:
        out["repetition_detection"] = dataclasses.asdict(request.repetition_detection)
    _put(out, "routed_experts_prompt_start", request.routed_experts_prompt_start, 0)
    return out


def _put(out: dict[str, Any], key: str, value: Any, default: Any) -> None:
    """Set ``key`` unless ``value`` is the field's default (msgspec's ``omit_defaults``)."""
    if value is None and default is None:
        return
    if value is not None and default is not None and type(value) is type(default) \
            and value == default:
        return
    out[key] = value


def generate_request(request_id: str, token_ids: Sequence[int], request: GenerationRequest,
                     sampling: dict[str, Any]) -> dict[str, Any]:
    """One ``GenerateRequest`` as ``model_dump()`` gives it (vLLM's field order)."""
    reasoning_ended = (
        True if isinstance(request, ChatCompletionRequest) and not request.include_reasoning
        else None
    )
    stream_options = None
    if request.stream and request.stream_options is not None:
        stream_options = request.stream_options.model_dump()
    return {
        "request_id": request_id,
        "token_ids": list(token_ids),
        "token_offsets": None,
        "features": None,
        "content_parts": None,
        "sampling_params": sampling,
        "model": request.model,
        "reasoning_ended": reasoning_ended,
        "reasoning_parser_kwargs": None,
        "return_token_ids": None,
        "output_mode": "tokens",
        "stream": bool(request.stream),
        "stream_options": stream_options,
        "cache_salt": request.cache_salt,
        "priority": request.priority,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
    }


def render_body(request_id: str, prompts: Sequence[Sequence[int]], request: GenerationRequest,
                max_model_len: int, defaults: Mapping[str, Any],
                prompt_lens: Sequence[int] | None = None) -> bytes:
    """The render reply: a list for a completion (ids ``<id>-<i>`` when it holds several
    prompts), one object for a chat request.

    ``prompt_lens`` are the lengths the context check sees (a text prompt's count is capped
    at ``max_model_len + 1``, as vLLM's truncating tokenizer reports it); default: the ids'.
    Raises :class:`~.errors.RequestError` as ``/v1/completions`` would refuse the request.
    """
    lens = [len(ids) for ids in prompts] if prompt_lens is None else prompt_lens
    items = []
    for i, ids in enumerate(prompts):
        max_tokens = resolve_max_tokens(request, lens[i], max_model_len,
                                        default_max_tokens=defaults.get("max_tokens"))
        rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
        sampling = sampling_params(request, max_tokens, defaults)
        items.append(generate_request(rid, ids, request, sampling))
    if isinstance(request, CompletionRequest):
        return to_json(items)
    return to_json(items[0])
