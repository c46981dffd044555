"""Benchmark workloads: seeded request generators and Poisson arrival schedules.

Generators
----------
:func:`shared_prefix` follows inference-perf's ``shared_prefix`` data generator:
``num_groups`` groups, each with its own random system prompt of
``system_prompt_len`` tokens; each of a group's ``prompts_per_group`` prompts is
that system prompt, a space and a unique random question of ``question_len``
tokens; the prompts of all groups are shuffled together (seeded) so groups
interleave. :func:`multi_turn` builds chat conversations whose every turn extends
the previous one, and :func:`low_sharing` is the control of unique prompts.
:func:`zipf_prefix` is the shared-prefix workload with a skewed popularity: each request
draws its group from a Zipf law over the groups' ranks, so a few prefixes are hot.

Token counting
--------------
Every ``*_len`` parameter counts *text* tokens: ``len(tok.encode(text,
add_special_tokens=False))`` of the generated system prompt, question, user
message or assistant answer. ``BenchRequest.prompt_tokens`` is the exact length
of the prompt the engine builds, as vLLM builds it:

- completions: ``len(tok.encode(prompt))`` -- with special tokens, so the BOS the
  tokenizer prepends is counted (``1 + system_prompt_len + question_len`` for a
  tokenizer that prepends one BOS);
- chat: ``len(tok.encode_chat(messages))`` -- the rendered chat template, its
  headers and BOS included.

Text is a random sequence of words from a pool of words that are a single token
both alone and after a space (taken from the tiny model's corpus word lists and
checked against the given tokenizer). Byte-level BPE tokenizers with a
GPT-2/Llama-3 style split (the tiny model, Llama 3, Qwen) never merge across
``" word"`` boundaries, so ``n`` pool words are exactly ``n`` tokens and lengths
are **exact** without encoding every prompt; a probe text checks the property
once per tokenizer. If the probe fails (a tokenizer that merges across words),
each text is encoded and trimmed to the longest word prefix that does not exceed
the target, which lands within one word's tokens below it (in practice within 1),
and ``prompt_tokens`` is then measured by encoding.

Arrivals
--------
:func:`poisson_arrivals` draws a Poisson process whose rate is piecewise constant
over :class:`Stage` windows; :func:`assign_arrivals` stamps a workload with those
times. A workload and a schedule of different sizes are truncated to the shorter
(``assign_arrivals``); to send more requests than a workload has prompts, as
inference-perf does when it cycles through its prompts, expand it first with
:func:`cycle_to`.
"""

from __future__ import annotations

import math
import random
import weakref
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from infermesh.libs.tinymodel import corpus

__all__ = [
    "BenchRequest",
    "Stage",
    "TextTokenizer",
    "assign_arrivals",
    "closed_loop",
    "cycle_to",
    "expected_count",
    "low_sharing",
    "multi_turn",
    "poisson_arrivals",
    "rate_at",
    "scale_time",
    "shared_prefix",
    "total_duration",
    "word_pool",
    "zipf_prefix",
    "zipf_weights",
]


class TextTokenizer(Protocol):
    """What the generators need of a tokenizer (``ModelTokenizer`` fits)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
        ...

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Prompt ids of chat ``messages`` (rendered template, generation prompt)."""
        ...


@dataclass(frozen=True, kw_only=True)
class BenchRequest:
    """One request of a benchmark workload.

    ``kind`` is ``"completion"`` (``prompt`` set) or ``"chat"`` (``messages`` set).
    ``group`` is the shared-prefix group (for multi-turn: the conversation's
    index), ``session`` the conversation id and ``turn`` its 0-based turn.
    ``prompt_tokens`` is the exact prompt length the engine sees (see the module
    docstring); ``arrival_s`` the send offset from the run's start.
    """

    id: int
    kind: Literal["completion", "chat"]
    prompt: str | None
    messages: list[dict[str, str]] | None
    max_tokens: int
    group: int | None
    session: str | None
    turn: int = 0
    prompt_tokens: int
    arrival_s: float = 0.0
    # Request headers of its own (the `tenants` preset: tenant and priority) and a class
    # label for per-class statistics.
    headers: tuple[tuple[str, str], ...] = ()
    tag: str = ""


# --------------------------------------------------------------------------- text


_CANDIDATE_LISTS = (
    corpus.NOUNS,
    corpus.VERBS,
    corpus.ADJECTIVES,
    corpus.ADVERBS,
    corpus.FUNCTION_WORDS,
    corpus.PRONOUNS,
    corpus.AUXILIARIES,
    corpus.NAMES,
)

#: A pool smaller than this makes random texts too repetitive to be unique.
_MIN_POOL = 32


@dataclass(frozen=True)
class _Pool:
    words: tuple[str, ...]
    exact: bool  # n pool words joined by spaces are exactly n tokens
    specials: int  # tokens encode(text) adds with add_special_tokens=True (BOS)


_POOLS: weakref.WeakKeyDictionary[Any, _Pool] = weakref.WeakKeyDictionary()


def _pool_for(tok: TextTokenizer) -> _Pool:
    """The tokenizer's word pool, computed once per tokenizer object."""
    try:
        return _POOLS[tok]
    except KeyError:
        pool = _build_pool(tok)
        _POOLS[tok] = pool
        return pool
    except TypeError:  # not weak-referenceable: no caching
        return _build_pool(tok)


def _build_pool(tok: TextTokenizer) -> _Pool:
    candidates = sorted({w for lst in _CANDIDATE_LISTS for w in lst if w.isascii() and w.isalpha()})
    single = [
        w
        for w in candidates
        if len(tok.encode(w, add_special_tokens=False)) == 1
        and len(tok.encode(" " + w, add_special_tokens=False)) == 1
    ]
    words = single if len(single) >= _MIN_POOL else candidates
    probe_rng = random.Random("infermesh-bench-probe")
    probe_words = list(words) * 2
    probe_rng.shuffle(probe_words)
    probe = " ".join(probe_words)
    exact = len(words) == len(single) and len(
        tok.encode(probe, add_special_tokens=False)
    ) == len(probe_words)
    specials = len(tok.encode(words[0], add_special_tokens=True)) - len(
        tok.encode(words[0], add_special_tokens=False)
    )
    return _Pool(tuple(words), exact, specials)


def word_pool(tok: TextTokenizer) -> tuple[tuple[str, ...], bool]:
    """The words texts are drawn from for ``tok``, and whether lengths are exact."""
    pool = _pool_for(tok)
    return pool.words, pool.exact


def _text(tok: TextTokenizer, pool: _Pool, rng: random.Random, n_tokens: int) -> str:
    """Random words totalling ``n_tokens`` text tokens (at most, off the exact path)."""
    if n_tokens <= 0:
        return ""
    if pool.exact:
        return " ".join(rng.choices(pool.words, k=n_tokens))
    # Measured path: draw words until long enough, then keep the longest word
    # prefix whose token count does not exceed the target.
    words = rng.choices(pool.words, k=n_tokens)

    def count(k: int) -> int:
        return len(tok.encode(" ".join(words[:k]), add_special_tokens=False))

    while count(len(words)) < n_tokens:
        words.extend(rng.choices(pool.words, k=max(1, n_tokens // 4)))
    lo, hi = 0, len(words)  # count(lo) <= target < ... ; find largest k with count(k) <= target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _completion_tokens(tok: TextTokenizer, pool: _Pool, prompt: str, text_tokens: int) -> int:
    if pool.exact:
        return text_tokens + pool.specials
    return len(tok.encode(prompt, add_special_tokens=True))


def _check_nonneg(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _unique_text(
    tok: TextTokenizer, pool: _Pool, rng: random.Random, n_tokens: int, seen: set[str]
) -> str:
    """A text not in ``seen`` (a few redraws; tiny lengths may have to repeat)."""
    text = _text(tok, pool, rng, n_tokens)
    for _ in range(16):
        if text not in seen:
            break
        text = _text(tok, pool, rng, n_tokens)
    seen.add(text)
    return text


# --------------------------------------------------------------------------- generators


def shared_prefix(
    tok: TextTokenizer,
    *,
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
    seed: int,
) -> list[BenchRequest]:
    """inference-perf's shared-prefix workload, as completion requests.

    Group ``g`` has a random system prompt of ``system_prompt_len`` tokens; each
    of its ``prompts_per_group`` prompts is ``system + " " + question`` with a
    question of ``question_len`` tokens unique within the group. All
    ``num_groups * prompts_per_group`` prompts are shuffled together by ``seed``;
    ``id`` is the position in the returned list.
    """
    _check_positive(num_groups=num_groups, prompts_per_group=prompts_per_group,
                    output_len=output_len)
    _check_nonneg(system_prompt_len=system_prompt_len, question_len=question_len)
    if system_prompt_len + question_len == 0:
        raise ValueError("system_prompt_len + question_len must be at least 1")
    pool = _pool_for(tok)
    rng = random.Random(f"shared_prefix:{seed}")
    items: list[tuple[int, str, int]] = []
    for group in range(num_groups):
        system = _text(tok, pool, rng, system_prompt_len)
        seen: set[str] = set()
        for _ in range(prompts_per_group):
            question = _unique_text(tok, pool, rng, question_len, seen)
            prompt = _join(system, question)
            items.append((group, prompt, system_prompt_len + question_len))
    rng.shuffle(items)
    return [
        BenchRequest(
            id=i,
            kind="completion",
            prompt=prompt,
            messages=None,
            max_tokens=output_len,
            group=group,
            session=None,
            prompt_tokens=_completion_tokens(tok, pool, prompt, n_text),
        )
        for i, (group, prompt, n_text) in enumerate(items)
    ]


def multi_turn(
    tok: TextTokenizer,
    *,
    conversations: int,
    turns: int,
    system_prompt_len: int,
    user_len: int,
    output_len: int,
    seed: int,
) -> list[BenchRequest]:
    """Chat conversations in which every turn extends the previous one.

    Conversation ``c`` (session ``"conv-<c>"``, group ``c``) has its own system
    prompt of ``system_prompt_len`` tokens (none when 0) and, per turn, a user
    message of ``user_len`` tokens. Turn ``t``'s messages are turn ``t-1``'s
    plus the assistant's answer to it -- a fixed random text of ``output_len``
    tokens standing in for the generation, so the workload does not depend on
    what the engine answers -- and the new user message. ``max_tokens`` is
    ``output_len``.

    Order: conversations are shuffled by ``seed``, then the list runs turn by
    turn (every conversation's turn 0, then every turn 1, ...), so a
    conversation's turns are in order and ``conversations - 1`` other requests
    separate consecutive turns.
    """
    _check_positive(conversations=conversations, turns=turns, user_len=user_len,
                    output_len=output_len)
    _check_nonneg(system_prompt_len=system_prompt_len)
    pool = _pool_for(tok)
    rng = random.Random(f"multi_turn:{seed}")
    per_conv: list[list[list[dict[str, str]]]] = []
    seen: set[str] = set()
    for _ in range(conversations):
        messages: list[dict[str, str]] = []
        if system_prompt_len:
            messages.append({"role": "system", "content": _text(tok, pool, rng, system_prompt_len)})
        turn_messages: list[list[dict[str, str]]] = []
        for turn in range(turns):
            if turn:
                answer = _text(tok, pool, rng, output_len)
                messages.append({"role": "assistant", "content": answer})
            user = _unique_text(tok, pool, rng, user_len, seen)
            messages.append({"role": "user", "content": user})
            turn_messages.append([dict(m) for m in messages])
        per_conv.append(turn_messages)
    order = list(range(conversations))
    rng.shuffle(order)
    out: list[BenchRequest] = []
    for turn in range(turns):
        for conv in order:
            msgs = per_conv[conv][turn]
            out.append(
                BenchRequest(
                    id=len(out),
                    kind="chat",
                    prompt=None,
                    messages=msgs,
                    max_tokens=output_len,
                    group=conv,
                    session=f"conv-{conv}",
                    turn=turn,
                    prompt_tokens=len(tok.encode_chat(msgs)),
                )
            )
    return out


def low_sharing(
    tok: TextTokenizer, *, num_prompts: int, prompt_len: int, output_len: int, seed: int
) -> list[BenchRequest]:
    """Control workload: ``num_prompts`` unique random completion prompts.

    Each prompt is ``prompt_len`` text tokens of random words drawn
    independently, so prompts share no prefix beyond a chance first word or two.
    """
    _check_positive(num_prompts=num_prompts, prompt_len=prompt_len, output_len=output_len)
    pool = _pool_for(tok)
    rng = random.Random(f"low_sharing:{seed}")
    seen: set[str] = set()
    out = []
    for i in range(num_prompts):
        prompt = _unique_text(tok, pool, rng, prompt_len, seen)
        out.append(
            BenchRequest(
                id=i,
                kind="completion",
                prompt=prompt,
                messages=None,
                max_tokens=output_len,
                group=None,
                session=None,
                prompt_tokens=_completion_tokens(tok, pool, prompt, prompt_len),
            )
        )
    return out


def zipf_weights(num_groups: int, s: float) -> list[float]:
    """The Zipf law over ranks 1..``num_groups``: P(rank k) = k^-s / Σ j^-s (s = 0: uniform)."""
    _check_positive(num_groups=num_groups)
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
        raise ValueError(f"zipf_s must be a finite number >= 0, got {s!r}")
    raw = [k ** -s for k in range(1, num_groups + 1)]
    total = math.fsum(raw)
    return [w / total for w in raw]


def zipf_prefix(
    tok: TextTokenizer,
    *,
    num_groups: int,
    num_requests: int,
    zipf_s: float,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
    seed: int,
) -> list[BenchRequest]:
    """Shared prefixes with a skewed popularity, as completion requests.

    Group ``g`` (0-based; ``g`` is its popularity rank − 1, so group 0 is the hottest) has a
    random system prompt of ``system_prompt_len`` tokens. Each of the ``num_requests``
    requests draws its group independently with probability ∝ ``(g + 1) ** -zipf_s``
    (:func:`zipf_weights`) and is ``system + " " + question``, its question of
    ``question_len`` tokens unique within the group. ``id`` is the position; the order is the
    draw order, so groups interleave as their popularity says.
    """
    _check_positive(num_requests=num_requests, output_len=output_len)
    _check_nonneg(system_prompt_len=system_prompt_len, question_len=question_len)
    weights = zipf_weights(num_groups, zipf_s)
    if system_prompt_len + question_len == 0:
        raise ValueError("system_prompt_len + question_len must be at least 1")
    pool = _pool_for(tok)
    rng = random.Random(f"zipf_prefix:{seed}")
    systems = [_text(tok, pool, rng, system_prompt_len) for _ in range(num_groups)]
    groups = rng.choices(range(num_groups), weights=weights, k=num_requests)
    seen: dict[int, set[str]] = defaultdict(set)
    out = []
    for i, group in enumerate(groups):
        prompt = _join(systems[group], _unique_text(tok, pool, rng, question_len, seen[group]))
        out.append(
            BenchRequest(
                id=i,
                kind="completion",
                prompt=prompt,
                messages=None,
                max_tokens=output_len,
                group=group,
                session=None,
                prompt_tokens=_completion_tokens(tok, pool, prompt,
                                                 system_prompt_len + question_len),
            )
        )
    return out


# --------------------------------------------------------------------------- arrivals


@dataclass(frozen=True)
class Stage:
    """A load stage: Poisson arrivals at ``rate_qps`` for ``duration_s`` seconds."""

    rate_qps: float
    duration_s: float

    def __post_init__(self) -> None:
        for name in ("rate_qps", "duration_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def total_duration(stages: Sequence[Stage]) -> float:
    """Sum of the stages' durations."""
    return math.fsum(s.duration_s for s in stages)


def expected_count(stages: Sequence[Stage]) -> float:
    """Expected number of arrivals: the sum of rate x duration."""
    return math.fsum(s.rate_qps * s.duration_s for s in stages)


def rate_at(stages: Sequence[Stage], t: float) -> float | None:
    """The rate of the stage whose window ``[start, end)`` holds ``t``; None outside."""
    start = 0.0
    for stage in stages:
        end = start + stage.duration_s
        if start <= t < end:
            return stage.rate_qps
        start = end
    return None


def poisson_arrivals(stages: Sequence[Stage], seed: int) -> list[float]:
    """Arrival offsets (seconds from 0, ascending) of a piecewise-rate Poisson process.

    Stage ``i`` covers ``[start_i, start_i + duration_i)`` with ``start_i`` the
    sum of the earlier durations. Within it, gaps are exponential with mean
    ``1 / rate_qps``; the process restarts at each stage's start (exact, since
    the exponential is memoryless). A stage of rate 0 is a pause.
    """
    rng = random.Random(f"poisson:{seed}")
    times: list[float] = []
    start = 0.0
    for stage in stages:
        end = start + stage.duration_s
        if stage.rate_qps > 0:
            t = start
            while True:
                t += -math.log(1.0 - rng.random()) / stage.rate_qps
                if t >= end:
                    break
                times.append(t)
        start = end
    return times


def scale_time(stages: Sequence[Stage], factor: float) -> list[Stage]:
    """Stages for a clock running ``1/factor`` times faster: rates / factor, durations x factor.

    With a simulator at ``time_scale=factor`` (0.1 runs ten times faster), the
    scaled stages offer the same requests per *modelled* second. Exponential
    gaps scale linearly with ``1/rate``, so ``poisson_arrivals(scale_time(s, f),
    seed)`` equals ``[t * f for t in poisson_arrivals(s, seed)]`` up to rounding.
    """
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a finite number > 0, got {factor!r}")
    return [Stage(s.rate_qps / factor, s.duration_s * factor) for s in stages]


def _session_ordered(requests: Sequence[BenchRequest]) -> list[BenchRequest]:
    """Requests in place, except that each session's turns take its slots in turn order."""
    out = list(requests)
    slots: dict[str, list[int]] = defaultdict(list)
    for index, req in enumerate(out):
        if req.session is not None:
            slots[req.session].append(index)
    for positions in slots.values():
        ordered = sorted((out[i] for i in positions), key=lambda r: r.turn)
        for i, req in zip(positions, ordered, strict=True):
            out[i] = req
    return out


def assign_arrivals(
    requests: Sequence[BenchRequest],
    times: Iterable[float],
    *,
    keep_session_order: bool = True,
) -> list[BenchRequest]:
    """Stamp ``requests`` (in list order) with the ascending ``times``.

    The i-th request gets the i-th smallest time. When the two differ in length
    both are truncated to the shorter: surplus requests are dropped from the end,
    surplus times unused (use :func:`cycle_to` first to reuse a workload's
    prompts for a longer schedule). With ``keep_session_order`` a conversation's
    requests are first rearranged among the positions they occupy so that its
    turns are in order; as times ascend with position, turn ``t`` is then never
    sent before turn ``t-1``, and truncation keeps a prefix of each conversation.
    """
    ordered = _session_ordered(requests) if keep_session_order else list(requests)
    stamps = sorted(times)
    return [replace(req, arrival_s=float(t)) for req, t in zip(ordered, stamps, strict=False)]


def closed_loop(requests: Sequence[BenchRequest]) -> list[BenchRequest]:
    """The requests with ``arrival_s = 0``: the marker for fixed-concurrency runs.

    A fixed-concurrency (closed-loop) runner sends the next request in list
    order whenever one of its slots frees up; arrival times do not apply.
    """
    return [replace(req, arrival_s=0.0) for req in requests]


def cycle_to(requests: Sequence[BenchRequest], count: int) -> list[BenchRequest]:
    """``count`` requests cycling through ``requests`` in order, re-numbered 0..count-1.

    This is how inference-perf feeds a long load schedule from a fixed prompt
    set (its llm-d configuration sends ~17,000 requests from 750 prompts): the
    k-th pass repeats the same prompts in the same order. Repeated
    conversations get the session id ``"<session>#<k>"`` (k >= 1) so a pass is a
    new conversation with the same text.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count and not requests:
        raise ValueError("cannot cycle an empty workload")
    out = []
    n = len(requests)
    for i in range(count):
        req = requests[i % n]
        k = i // n
        session = req.session if (req.session is None or k == 0) else f"{req.session}#{k}"
        out.append(replace(req, id=i, session=session))
    return out
