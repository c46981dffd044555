"""Workload generators and arrival schedules of ``infermesh bench``."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from infermesh.libs.tokenization import ModelTokenizer
from infermesh.services.bench.workload import (
    BenchRequest,
    Stage,
    assign_arrivals,
    closed_loop,
    cycle_to,
    expected_count,
    low_sharing,
    multi_turn,
    poisson_arrivals,
    rate_at,
    scale_time,
    shared_prefix,
    total_duration,
    word_pool,
    zipf_prefix,
    zipf_weights,
)


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.from_folder(model_dir)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def group_prefix(seqs: Sequence[Sequence[int]]) -> int:
    return min(common_prefix(seqs[0], s) for s in seqs[1:])


# --------------------------------------------------------------------------- shared prefix


def test_word_pool_is_exact_for_tiny_model(tok: ModelTokenizer) -> None:
    words, exact = word_pool(tok)
    assert exact
    assert len(words) >= 100
    assert all(len(tok.encode(" " + w, add_special_tokens=False)) == 1 for w in words)


@pytest.mark.parametrize(
    ("system_len", "question_len"), [(200, 50), (1, 1), (0, 17), (33, 0), (6000, 1200)]
)
def test_shared_prefix_lengths_are_exact(
    tok: ModelTokenizer, system_len: int, question_len: int
) -> None:
    reqs = shared_prefix(tok, num_groups=2, prompts_per_group=3, system_prompt_len=system_len,
                         question_len=question_len, output_len=7, seed=3)
    assert len(reqs) == 6
    for req in reqs:
        assert req.kind == "completion" and req.messages is None and req.prompt is not None
        assert req.max_tokens == 7
        ids = tok.encode(req.prompt)  # add_special_tokens=True, as vLLM's completions API
        assert len(ids) == req.prompt_tokens == 1 + system_len + question_len
        assert ids[0] == tok.bos_token_id


def test_shared_prefix_sharing_structure(tok: ModelTokenizer) -> None:
    reqs = shared_prefix(tok, num_groups=12, prompts_per_group=5, system_prompt_len=96,
                         question_len=40, output_len=10, seed=11)
    assert len(reqs) == 60
    assert [r.id for r in reqs] == list(range(60))
    by_group: dict[int, list[BenchRequest]] = {}
    for r in reqs:
        assert r.group is not None
        by_group.setdefault(r.group, []).append(r)
    assert sorted(by_group) == list(range(12))
    assert all(len(v) == 5 for v in by_group.values())

    firsts = []
    for members in by_group.values():
        ids = [tok.encode(m.prompt or "") for m in members]
        # The group shares exactly BOS + the system prompt's tokens; questions differ.
        assert group_prefix(ids) == 1 + 96
        assert len({m.prompt for m in members}) == 5
        firsts.append(ids[0])
    # Different groups share at most BOS and a chance word or two.
    worst = max(common_prefix(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1:])
    assert worst <= 1 + 3


def test_shared_prefix_interleaves_groups(tok: ModelTokenizer) -> None:
    reqs = shared_prefix(tok, num_groups=20, prompts_per_group=5, system_prompt_len=8,
                         question_len=4, output_len=1, seed=5)
    groups = [r.group for r in reqs]
    assert len(set(groups[:20])) >= 10  # the first 20 already span many groups
    same_neighbour = sum(a == b for a, b in pairwise(groups))
    assert same_neighbour <= 15  # a grouped order would have 80


def test_shared_prefix_reproducible(tok: ModelTokenizer) -> None:
    args: dict[str, Any] = dict(num_groups=4, prompts_per_group=3, system_prompt_len=30,
                                question_len=10, output_len=5)
    a = shared_prefix(tok, seed=1, **args)
    assert a == shared_prefix(tok, seed=1, **args)
    b = shared_prefix(tok, seed=2, **args)
    assert [r.prompt for r in a] != [r.prompt for r in b]
    assert {r.prompt for r in a}.isdisjoint({r.prompt for r in b})


@pytest.mark.parametrize(
    "bad",
    [dict(num_groups=0), dict(prompts_per_group=0), dict(output_len=0),
     dict(system_prompt_len=-1), dict(system_prompt_len=0, question_len=0)],
)
def test_shared_prefix_rejects_bad_parameters(tok: ModelTokenizer, bad: dict[str, int]) -> None:
    args = dict(num_groups=2, prompts_per_group=2, system_prompt_len=4, question_len=4,
                output_len=4, seed=0)
    with pytest.raises(ValueError):
        shared_prefix(tok, **{**args, **bad})


# --------------------------------------------------------------------------- zipf prefix


def test_zipf_weights() -> None:
    w = zipf_weights(4, 1.0)
    assert w == pytest.approx([12 / 25, 6 / 25, 4 / 25, 3 / 25])  # 1, 1/2, 1/3, 1/4 over 25/12
    assert zipf_weights(3, 0.0) == pytest.approx([1 / 3] * 3)
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError):
            zipf_weights(3, bad)
    with pytest.raises(ValueError):
        zipf_weights(0, 1.0)


def test_zipf_prefix_popularity_is_skewed_as_specified(tok: ModelTokenizer) -> None:
    n, groups, s = 4000, 16, 1.1
    reqs = zipf_prefix(tok, num_groups=groups, num_requests=n, zipf_s=s, system_prompt_len=4,
                       question_len=6, output_len=3, seed=7)
    assert [r.id for r in reqs] == list(range(n))
    counts = [sum(r.group == g for r in reqs) for g in range(groups)]
    expected = zipf_weights(groups, s)
    assert expected[0] == pytest.approx(0.330, abs=0.001)  # what the preset's description says
    for g in range(groups):
        # Within 4 binomial standard deviations of the law.
        sd = math.sqrt(n * expected[g] * (1 - expected[g]))
        assert abs(counts[g] - n * expected[g]) <= 4 * sd, (g, counts[g], n * expected[g])
    # Skewed: the hottest group alone outnumbers the coldest half of the groups together.
    assert counts[0] > sum(counts[groups // 2:])
    assert counts[0] > counts[1] > counts[3] > counts[-1]


def test_zipf_prefix_prompts_share_their_group_prefix(tok: ModelTokenizer) -> None:
    reqs = zipf_prefix(tok, num_groups=5, num_requests=60, zipf_s=1.0, system_prompt_len=64,
                       question_len=16, output_len=4, seed=3)
    by_group: dict[int, list[BenchRequest]] = {}
    for r in reqs:
        assert r.kind == "completion" and r.prompt is not None and r.max_tokens == 4
        ids = tok.encode(r.prompt)
        assert len(ids) == r.prompt_tokens == 1 + 64 + 16
        assert r.group is not None
        by_group.setdefault(r.group, []).append(r)
    for members in by_group.values():
        if len(members) > 1:
            assert group_prefix([tok.encode(m.prompt or "") for m in members]) == 1 + 64
            assert len({m.prompt for m in members}) == len(members)  # unique questions
    firsts = [tok.encode(v[0].prompt or "") for v in by_group.values()]
    assert max(common_prefix(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1:]) <= 4


def test_zipf_prefix_is_deterministic_with_its_seed(tok: ModelTokenizer) -> None:
    args: dict[str, Any] = dict(num_groups=6, num_requests=40, zipf_s=1.2, system_prompt_len=20,
                                question_len=5, output_len=2)
    a = zipf_prefix(tok, seed=1, **args)
    assert a == zipf_prefix(tok, seed=1, **args)
    b = zipf_prefix(tok, seed=2, **args)
    assert [r.group for r in a] != [r.group for r in b]
    assert {r.prompt for r in a}.isdisjoint({r.prompt for r in b})


@pytest.mark.parametrize(
    "bad",
    [dict(num_groups=0), dict(num_requests=0), dict(output_len=0), dict(zipf_s=-1.0),
     dict(system_prompt_len=-1), dict(system_prompt_len=0, question_len=0)],
)
def test_zipf_prefix_rejects_bad_parameters(tok: ModelTokenizer, bad: dict[str, Any]) -> None:
    args: dict[str, Any] = dict(num_groups=2, num_requests=4, zipf_s=1.0, system_prompt_len=4,
                                question_len=4, output_len=4, seed=0)
    with pytest.raises(ValueError):
        zipf_prefix(tok, **{**args, **bad})


# --------------------------------------------------------------------------- multi-turn


def test_multi_turn_structure_and_lengths(tok: ModelTokenizer) -> None:
    reqs = multi_turn(tok, conversations=6, turns=4, system_prompt_len=50, user_len=20,
                      output_len=15, seed=9)
    assert len(reqs) == 24
    assert [r.id for r in reqs] == list(range(24))
    sessions: dict[str, list[BenchRequest]] = {}
    for r in reqs:
        assert r.kind == "chat" and r.prompt is None and r.messages is not None
        assert r.max_tokens == 15
        assert r.session is not None
        sessions.setdefault(r.session, []).append(r)
        assert len(tok.encode_chat(r.messages)) == r.prompt_tokens
        roles = [m["role"] for m in r.messages]
        assert roles == ["system"] + ["user", "assistant"] * r.turn + ["user"]
        lengths = {"system": 50, "user": 20, "assistant": 15}
        for m in r.messages:
            assert len(tok.encode(m["content"], add_special_tokens=False)) == lengths[m["role"]]
    assert len(sessions) == 6
    # The list runs turn by turn; each conversation's turns are in order.
    assert [r.turn for r in reqs] == [t for t in range(4) for _ in range(6)]
    first_systems = set()
    for turns in sessions.values():
        assert [r.turn for r in turns] == [0, 1, 2, 3]
        assert len({r.group for r in turns}) == 1
        for prev, cur in pairwise(turns):
            assert prev.messages is not None and cur.messages is not None
            # Messages extend the previous turn's, and so do the prompt tokens.
            assert cur.messages[: len(prev.messages)] == prev.messages
            prev_ids, cur_ids = tok.encode_chat(prev.messages), tok.encode_chat(cur.messages)
            assert cur_ids[: len(prev_ids)] == prev_ids
            assert cur.prompt_tokens > prev.prompt_tokens + 15 + 20
        assert turns[0].messages is not None
        first_systems.add(turns[0].messages[0]["content"])
    assert len(first_systems) == 6  # every conversation has its own system prompt


def test_multi_turn_without_system_prompt_and_reproducible(tok: ModelTokenizer) -> None:
    args: dict[str, Any] = dict(conversations=3, turns=2, system_prompt_len=0, user_len=5,
                                output_len=5)
    a = multi_turn(tok, seed=4, **args)
    assert all(r.messages is not None and r.messages[0]["role"] == "user" for r in a)
    assert a == multi_turn(tok, seed=4, **args)
    assert a != multi_turn(tok, seed=5, **args)


# --------------------------------------------------------------------------- low sharing


def test_low_sharing_unique_prompts(tok: ModelTokenizer) -> None:
    reqs = low_sharing(tok, num_prompts=80, prompt_len=64, output_len=8, seed=2)
    assert len(reqs) == 80
    ids = [tok.encode(r.prompt or "") for r in reqs]
    assert all(len(i) == r.prompt_tokens == 65 for i, r in zip(ids, reqs, strict=True))
    assert all(r.group is None and r.session is None for r in reqs)
    worst = max(common_prefix(a, b) for i, a in enumerate(ids) for b in ids[i + 1:])
    assert worst <= 1 + 3
    assert reqs == low_sharing(tok, num_prompts=80, prompt_len=64, output_len=8, seed=2)
    other = low_sharing(tok, num_prompts=80, prompt_len=64, output_len=8, seed=3)
    assert [r.prompt for r in other] != [r.prompt for r in reqs]


class CharChunkTokenizer:
    """A tokenizer that merges across words (4-character chunks): no exact fast path."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [sum(map(ord, text[i:i + 4])) % 1000 + 1 for i in range(0, len(text), 4)]
        return [0, *ids] if add_special_tokens else ids

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return self.encode("\n".join(m["content"] for m in messages))


def test_measured_path_for_tokenizers_that_merge_words() -> None:
    fake = CharChunkTokenizer()
    words, exact = word_pool(fake)
    assert not exact and len(words) >= 32
    reqs = low_sharing(fake, num_prompts=10, prompt_len=50, output_len=4, seed=1)
    for r in reqs:
        n_text = len(fake.encode(r.prompt or "", add_special_tokens=False))
        assert 49 <= n_text <= 50  # the longest word prefix not over the target
        assert r.prompt_tokens == len(fake.encode(r.prompt or ""))
    sp = shared_prefix(fake, num_groups=2, prompts_per_group=2, system_prompt_len=30,
                       question_len=10, output_len=4, seed=1)
    assert all(r.prompt_tokens == len(fake.encode(r.prompt or "")) for r in sp)


# --------------------------------------------------------------------------- arrivals


STAGES = [Stage(5.0, 400.0), Stage(50.0, 40.0), Stage(0.0, 10.0), Stage(20.0, 100.0)]


def windows(stages: Sequence[Stage]) -> list[tuple[float, float, float]]:
    out, start = [], 0.0
    for s in stages:
        out.append((start, start + s.duration_s, s.rate_qps))
        start += s.duration_s
    return out


def test_poisson_arrivals_follow_stage_rates() -> None:
    times = poisson_arrivals(STAGES, seed=7)
    assert times == sorted(times)
    assert 0.0 <= times[0] and times[-1] < total_duration(STAGES) == 550.0
    for start, end, rate in windows(STAGES):
        inside = [t for t in times if start <= t < end]
        expected = rate * (end - start)
        if rate == 0:
            assert inside == []
            continue
        # Poisson count: standard deviation sqrt(expected) (~45 for 2000); allow 4 sigma.
        assert abs(len(inside) - expected) <= 4 * math.sqrt(expected)
        gaps = [b - a for a, b in pairwise(inside)]
        assert len(gaps) >= 1900
        # Mean gap 1/rate within 10% (its relative sd is 1/sqrt(n), ~2.3% here).
        assert statistics.fmean(gaps) == pytest.approx(1.0 / rate, rel=0.10)
        # Exponential gaps: sd == mean, and P(gap > mean) = 1/e.
        assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.10)
        above = sum(g > 1.0 / rate for g in gaps) / len(gaps)
        assert above == pytest.approx(math.exp(-1), abs=0.04)
    assert len(times) == pytest.approx(expected_count(STAGES), rel=0.05)


def test_poisson_arrivals_reproducible() -> None:
    stages = [Stage(10.0, 5.0), Stage(3.0, 5.0)]
    assert poisson_arrivals(stages, seed=1) == poisson_arrivals(stages, seed=1)
    assert poisson_arrivals(stages, seed=1) != poisson_arrivals(stages, seed=2)
    assert poisson_arrivals([], seed=1) == []
    assert poisson_arrivals([Stage(0.0, 10.0)], seed=1) == []


def test_scale_time() -> None:
    scaled = scale_time(STAGES, 0.1)
    assert scaled == [Stage(50.0, 40.0), Stage(500.0, 4.0), Stage(0.0, 1.0), Stage(200.0, 10.0)]
    assert expected_count(scaled) == pytest.approx(expected_count(STAGES))
    assert total_duration(scaled) == pytest.approx(55.0)
    base = poisson_arrivals(STAGES, seed=3)
    fast = poisson_arrivals(scaled, seed=3)
    assert len(fast) == len(base)
    assert fast == pytest.approx([t * 0.1 for t in base], rel=1e-9, abs=1e-9)
    with pytest.raises(ValueError):
        scale_time(STAGES, 0)


def test_stage_helpers_and_validation() -> None:
    assert rate_at(STAGES, 0.0) == 5.0
    assert rate_at(STAGES, 400.0) == 50.0  # windows are [start, end)
    assert rate_at(STAGES, 445.0) == 0.0
    assert rate_at(STAGES, 549.9) == 20.0
    assert rate_at(STAGES, 550.0) is None
    assert expected_count(STAGES) == 2000 + 2000 + 0 + 2000
    for bad in [(-1.0, 1.0), (1.0, -1.0), (math.inf, 1.0), (math.nan, 1.0)]:
        with pytest.raises(ValueError):
            Stage(*bad)


def _req(i: int, session: str | None = None, turn: int = 0) -> BenchRequest:
    return BenchRequest(id=i, kind="completion", prompt=f"p{i}", messages=None, max_tokens=1,
                        group=None, session=session, turn=turn, prompt_tokens=2)


def test_assign_arrivals_truncates_to_shorter() -> None:
    reqs = [_req(i) for i in range(5)]
    out = assign_arrivals(reqs, [3.0, 1.0, 2.0])
    assert [(r.id, r.arrival_s) for r in out] == [(0, 1.0), (1, 2.0), (2, 3.0)]
    out = assign_arrivals(reqs, [float(t) for t in range(8)])
    assert [r.arrival_s for r in out] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert reqs[0].arrival_s == 0.0  # inputs untouched (frozen)


def test_assign_arrivals_keeps_session_turns_in_order(tok: ModelTokenizer) -> None:
    conv = multi_turn(tok, conversations=4, turns=3, system_prompt_len=4, user_len=4,
                      output_len=4, seed=1)
    shuffled = list(reversed(conv))  # every conversation's turns now run backwards
    times = poisson_arrivals([Stage(10.0, 100.0)], seed=1)
    out = assign_arrivals(shuffled, times)
    by_session: dict[str, list[BenchRequest]] = {}
    for r in out:
        assert r.session is not None
        by_session.setdefault(r.session, []).append(r)
    for turns in by_session.values():
        ordered = sorted(turns, key=lambda r: r.arrival_s)
        assert [r.turn for r in ordered] == [0, 1, 2]
    # Without the option, the list order is taken as is.
    raw = assign_arrivals(shuffled, times, keep_session_order=False)
    assert [r.id for r in raw] == [r.id for r in shuffled]
    # Truncation keeps a prefix of every conversation's turns.
    short = assign_arrivals(shuffled, times[:6])
    assert sorted(r.turn for r in short) == [0, 0, 0, 0, 1, 1]


def test_cycle_to_and_closed_loop() -> None:
    reqs = [_req(0, "a", 0), _req(1, "a", 1), _req(2)]
    out = cycle_to(reqs, 7)
    assert [r.id for r in out] == list(range(7))
    assert [r.prompt for r in out] == ["p0", "p1", "p2"] * 2 + ["p0"]
    assert [r.session for r in out] == ["a", "a", None, "a#1", "a#1", None, "a#2"]
    assert cycle_to(reqs, 0) == []
    with pytest.raises(ValueError):
        cycle_to([], 1)
    stamped = [replace(r, arrival_s=5.0) for r in reqs]
    assert [r.arrival_s for r in closed_loop(stamped)] == [0.0, 0.0, 0.0]
