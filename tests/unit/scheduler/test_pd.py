"""Prefill/decode disaggregation in the scheduler: the pd profile handler and its deciders."""

from __future__ import annotations

import random

import pytest
import yaml
from prometheus_client import generate_latest

from infermesh.libs.config import ConfigError
from infermesh.libs.scheduling.config import (
    DEFAULT_PIPELINE_YAML,
    build_pipeline,
    load_pipeline,
    parse_pipeline,
)
from infermesh.libs.scheduling.framework import Handle, NoCandidates
from infermesh.libs.scheduling.metrics import SchedulerMetrics
from infermesh.libs.scheduling.scheduler import Scheduler
from infermesh.proto.messages import LookupReply, LookupRequest, PodMatch

from .conftest import pod, req

BLOCK = 16


async def index(msg: LookupRequest, timeout: float) -> LookupReply:
    # "d1" holds the first 30 blocks of every prompt, "p1" the first 10.
    n = len(msg.block_keys)
    return LookupReply(matches=[PodMatch(pod="d1", blocks=min(30, n)),
                                PodMatch(pod="p1", blocks=min(10, n))])


def scheduler(yaml_text: str = DEFAULT_PIPELINE_YAML) -> tuple[Scheduler, SchedulerMetrics]:
    metrics = SchedulerMetrics()
    handle = Handle(metrics, index, random.Random(3))
    return Scheduler(build_pipeline(parse_pipeline(yaml.safe_load(yaml_text)), handle),
                     metrics), metrics


def fleet() -> list:
    return [pod("d0", role="decode", block_size=BLOCK), pod("d1", role="decode", block_size=BLOCK),
            pod("p0", role="prefill", block_size=BLOCK), pod("p1", role="prefill",
                                                            block_size=BLOCK)]


def verdicts(metrics: SchedulerMetrics) -> dict[str, float]:
    out = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("infermesh_scheduler_pd_decisions_total{"):
            label = line.split('decision="')[1].split('"')[0]
            out[label] = float(line.rsplit(" ", 1)[1])
    return out


def keys(n_blocks: int) -> list[int]:
    return list(range(1, n_blocks + 1))


async def test_a_long_uncached_prompt_is_prefilled_elsewhere() -> None:
    s, metrics = scheduler()
    # 100 blocks = 1600 tokens; d1 (most cached) holds 30 → 1120 uncached ≥ 512.
    d = await s.schedule(req(keys=keys(100)), fleet())
    assert d.pod == "d1" and d.profile == "default"
    assert d.prefill_pod == "p1" and d.prefill_url == "http://p1:8000"  # p1 holds 10 blocks
    assert d.prefill_profile == "prefill"
    assert verdicts(metrics) == {"disaggregated": 1.0}


async def test_the_threshold_counts_only_what_the_decode_pod_lacks() -> None:
    s, metrics = scheduler()
    # 40 blocks = 640 tokens, 30 cached on d1: 160 uncached < 512 → served whole on d1.
    d = await s.schedule(req(keys=keys(40)), fleet())
    assert d.pod == "d1" and d.prefill_pod == "" and d.prefill_url == ""
    # Just at the threshold (512 uncached: 62 blocks, 30 cached) → disaggregated.
    d = await s.schedule(req(keys=keys(62)), fleet())
    assert d.pod == "d1" and d.prefill_pod
    # Short prompts stay whole anywhere.
    d = await s.schedule(req(keys=keys(3)), fleet())
    assert d.prefill_pod == ""
    assert verdicts(metrics) == {"aggregated": 2.0, "disaggregated": 1.0}


async def test_prefill_engines_never_serve_a_whole_request_or_decode() -> None:
    s, _ = scheduler()
    for n in (1, 5, 80, 200):
        d = await s.schedule(req(request_id=f"r{n}", keys=keys(n)), fleet())
        assert d.pod.startswith("d")
        assert d.prefill_pod in ("", "p0", "p1")


async def test_a_fleet_without_prefill_engines_is_served_whole() -> None:
    s, metrics = scheduler()
    pods = [pod("d0", block_size=BLOCK), pod("d1", block_size=BLOCK)]  # role "both"
    d = await s.schedule(req(keys=keys(100)), pods)
    assert d.pod == "d1" and d.prefill_pod == ""
    assert verdicts(metrics) == {"no_prefill_engine": 1.0}


async def test_no_decode_engine_is_no_candidate_even_with_prefill_engines() -> None:
    s, _ = scheduler()
    with pytest.raises(NoCandidates):
        await s.schedule(req(keys=keys(100)), [pod("p0", role="prefill")])


PARAMS = ("      decider: prefix-aware\n      prefill_profile: prefill\n"
          "      profile_deciders: {pd-always: always, pd-never: never}\n")


def _with(decider: str, extra: str = "") -> str:
    assert PARAMS in DEFAULT_PIPELINE_YAML
    return DEFAULT_PIPELINE_YAML.replace(
        PARAMS, f"      decider: {decider}\n      prefill_profile: prefill\n{extra}")


async def test_always_and_never_deciders() -> None:
    always, _ = scheduler(_with("always"))
    assert (await always.schedule(req(keys=keys(1)), fleet())).prefill_pod
    never, _ = scheduler(_with("never"))
    assert (await never.schedule(req(keys=keys(500)), fleet())).prefill_pod == ""


async def test_deciders_per_profile_for_side_by_side_benchmarks() -> None:
    s, _ = scheduler(_with("never", "      profile_deciders: {llm-d: always}\n"))
    assert (await s.schedule(req(keys=keys(2)), fleet())).prefill_pod == ""
    assert (await s.schedule(req(keys=keys(2), profile="llm-d"), fleet())).prefill_pod


async def test_asking_for_the_prefill_profile_itself_runs_it_alone() -> None:
    s, _ = scheduler()
    d = await s.schedule(req(keys=keys(100), profile="prefill"), fleet())
    assert d.pod.startswith("p") and d.prefill_pod == ""


@pytest.mark.parametrize(("params", "complaint"), [
    ("decider: nowhere", "'decider' names 'nowhere'"),
    ("decider: load", "'decider' names 'load', which is not a decider"),
    ("prefill_profile: prefilling", "'prefill_profile' names 'prefilling'"),
    ("profile_deciders: {nope: always}", "profile 'nope'"),
    ("threshhold: 3", "threshhold"),
])
def test_bad_handler_parameters_are_refused(params: str, complaint: str) -> None:
    text = DEFAULT_PIPELINE_YAML.replace(PARAMS, f"      {params}\n")
    if params.startswith("threshhold"):
        text = DEFAULT_PIPELINE_YAML.replace("threshold: 512", params)
    with pytest.raises(ConfigError, match=complaint):
        build_pipeline(parse_pipeline(yaml.safe_load(text)),
                       Handle(SchedulerMetrics(), None, random.Random(1)))


def test_a_decider_cannot_run_inside_a_profile(handle: Handle) -> None:
    text = DEFAULT_PIPELINE_YAML.replace("      - ref: prefill-roles\n",
                                         "      - ref: prefill-roles\n      - ref: always\n")
    with pytest.raises(ConfigError, match="cannot run in a profile"):
        build_pipeline(parse_pipeline(yaml.safe_load(text)), handle)


async def test_the_default_pipeline_loads_with_deciders_per_profile(handle: Handle) -> None:
    assert "prefill" in load_pipeline(None, handle).profiles
    s, _ = scheduler()
    assert (await s.schedule(req(keys=keys(2), profile="pd-always"), fleet())).prefill_pod
    assert not (await s.schedule(req(keys=keys(500), profile="pd-never"), fleet())).prefill_pod
