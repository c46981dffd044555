"""`infermesh bench`: one workload, several scheduler profiles, each on a cold system.

A preset fixes the workload (generator and parameters), the arrival stages (in modelled time),
the simulated fleet, and the profiles to compare. For every profile a fresh local system starts
(cold engines, empty index, no routing history), the same seeded requests arrive at the same
(time-scaled) moments, and every request is measured. Latencies are reported in modelled seconds:
a simulator at ``time_scale`` 0.25 runs four times faster than the GPU it models.

With ``--peers sglang-router,vllm-router`` each policy of those routers (``--peer-policies`` for
a subset) runs as one more row, in front of a fresh fleet of the same simulated engines, with
the same requests at the same moments. ``--repeat N`` runs the whole set N times (fresh systems
each time) and reports the median and the spread. Every row also reports the CPU seconds per
1,000 requests of its control plane (our services and nats-server, or the peer router) and of
its engines.

A fleet preset (``--preset autoscale``) compares fleets instead: the same day of load on fixed
fleets and on the autoscaler from zero, engines taking ``--startup-delay-s`` to start; it reports
engine-seconds, replicas over time (replicas.csv, replicas.svg) and the requests that arrived at
zero replicas (docs/bench.md).

With ``--url`` the same requests go to any OpenAI endpoint instead (a bare vLLM, another router);
the profile then only travels as the ``x-infermesh-profile`` header. The preset's time scale
still sets the arrival moments and converts latencies to modelled seconds: give
``--time-scale 1`` for a real engine, or the scale of the simulators behind the endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from infermesh.libs.config import ConfigError
from infermesh.libs.telemetry import configure_logging
from infermesh.libs.tinymodel import DEFAULT_MODEL_NAME, ensure_model_folder
from infermesh.libs.tokenization import ModelTokenizer
from infermesh.proto.subjects import Subjects
from infermesh.services.system.plan import plan
from infermesh.services.system.run import LocalSystem
from infermesh.services.system.spec import SystemSpec

from . import fleets as F
from . import metrics as M
from . import peers as P
from . import repeats as R
from . import storage as S
from . import tenants as T
from . import workload as W
from .client import send
from .cpu import CpuMeter, self_cpu_s

ALL_PROFILES = ["random", "round-robin", "load", "approx-prefix", "llm-d", "default"]


@dataclass
class Preset:
    """A named benchmark: workload, arrivals, fleet and profiles.

    With ``fleets`` the rows are fleets instead of profiles (the ``autoscale`` preset): each
    runs the preset's first profile on its own engines, fixed or autoscaled, with the
    simulator's ``startup_delay_s``.
    """

    name: str
    description: str
    workload: Callable[[ModelTokenizer, int], list[W.BenchRequest]]
    stages: list[W.Stage]  # modelled time
    system: SystemSpec  # the fleet; ports, state folder and timeouts are the bench's
    profiles: list[str] = field(default_factory=lambda: list(ALL_PROFILES))
    fleets: list[F.Fleet] = field(default_factory=list)
    startup_delay_s: float = 0.0  # the engines' start (modelled s), for fleet rows
    table: tuple[tuple[str, str, str, float, bool], ...] | None = None  # its table's columns
    # The stage at the fleet's knee (index into ``stages``): its TTFTs and throughputs are
    # reported as ``knee_*`` (the table's columns when ``table`` names them).
    knee_stage: int | None = None
    # Arrival moments of its own (the `tenants` preset: a Poisson process per class of
    # request) instead of one process over the stages: (workload, wall stages, seed) → stamped.
    arrivals: Callable[[list[W.BenchRequest], list[W.Stage], int],
                       list[W.BenchRequest]] | None = None
    # Figures across the rows of one repeat (their summaries), after they all ran.
    compare: Callable[[dict[str, dict[str, Any]]], None] | None = None

    @property
    def baseline(self) -> F.Fleet | None:
        """The fleet the others are compared with: the largest fixed one."""
        fixed = [f for f in self.fleets if not f.autoscaled]
        return max(fixed, key=lambda f: f.engines) if fixed else None


def _quick_workload(tok: ModelTokenizer, seed: int) -> list[W.BenchRequest]:
    return W.shared_prefix(tok, num_groups=8, prompts_per_group=6, system_prompt_len=1000,
                           question_len=200, output_len=24, seed=seed)


def _llmd_workload(tok: ModelTokenizer, seed: int) -> list[W.BenchRequest]:
    # llm-d "KV-Cache Wins You Can See": 150 groups x 5 users, 6,000-token shared prefixes,
    # 1,200-token questions. Output shortened (the engines' decode is modelled, not the point).
    return W.shared_prefix(tok, num_groups=150, prompts_per_group=5, system_prompt_len=6000,
                           question_len=1200, output_len=32, seed=seed)


def _pd_workload(tok: ModelTokenizer, seed: int) -> list[W.BenchRequest]:
    # Half long prompts (6,000 tokens, never seen: all prefill), half short (300); every
    # answer 128 tokens, streamed. Interleaved, so short decodes run beside long prefills.
    long = W.low_sharing(tok, num_prompts=60, prompt_len=6000, output_len=128, seed=seed)
    short = W.low_sharing(tok, num_prompts=60, prompt_len=300, output_len=128, seed=seed + 1)
    out = [r for pair in zip(long, short, strict=True) for r in pair]
    return [dataclasses.replace(r, id=i) for i, r in enumerate(out)]


def _tiered_workload(tok: ModelTokenizer, seed: int) -> list[W.BenchRequest]:
    # llm-d's tiered-caching guide (250 groups x 5 users, long system prompts) scaled to this
    # machine: 100 groups x 5, 2,000-token system prompts + 200-token questions. Requests come
    # in rounds (every group's first prompt, in random order, then every group's second, …),
    # so a group returns only after the 99 others: its prefix has left the GPU by then.
    reqs = W.shared_prefix(tok, num_groups=100, prompts_per_group=5, system_prompt_len=2000,
                           question_len=200, output_len=16, seed=seed)
    by_group: dict[int, list[W.BenchRequest]] = {}
    for r in reqs:
        by_group.setdefault(r.group if r.group is not None else -1, []).append(r)
    rng = random.Random(f"tiered:{seed}")
    out: list[W.BenchRequest] = []
    for k in range(max(len(v) for v in by_group.values())):
        groups = sorted(g for g, v in by_group.items() if len(v) > k)
        rng.shuffle(groups)
        out += [by_group[g][k] for g in groups]
    return [dataclasses.replace(r, id=i) for i, r in enumerate(out)]


# Saturation: 16 groups of 3,000-token prefixes, popularity Zipf(1.1) over the groups (the
# hottest 33% of the requests, the next 15%, 10%, …, the coldest 1.6%), 500-token questions.
SATURATION_GROUPS = 16
SATURATION_ZIPF_S = 1.1


def _saturation_workload(tok: ModelTokenizer, seed: int) -> list[W.BenchRequest]:
    # More prompts than the stages send (≈ 300 of 600): no prompt is sent twice.
    return W.zipf_prefix(tok, num_groups=SATURATION_GROUPS, num_requests=600,
                         zipf_s=SATURATION_ZIPF_S, system_prompt_len=3000, question_len=500,
                         output_len=16, seed=seed)


def _autoscale_workload(tok: ModelTokenizer, seed: int) -> list[W.BenchRequest]:
    # Unique prompts: no prefix to route on, so the rows differ only in their engines.
    return W.low_sharing(tok, num_prompts=400, prompt_len=200, output_len=20, seed=seed)


# Real vLLM on the CPU machines answers /v1/models 23-27 s after it starts (--enforce-eager).
VLLM_STARTUP_S = 25.0
AUTOSCALE_MAX = 4
# The autoscaler for a compressed day (modelled seconds, scaled by the time scale): decisions
# every 2 s, a scale-up at most every 10 s, a scale-down only to the highest need of the last
# 20 s (a dip at the peak must not drain an engine that takes 25 s to come back; 30 s held the
# trough's engines longer for no gain in TTFT once scale from zero was sized from the held
# queue, docs/bench.md) and not within 30 s of a change (longer than an engine's start: a
# replica still booting is not judged idle), zero after 10 s without a request. Scale up when
# the engines' mean KV usage passes 0.45 (spare < 0.35) instead of 0.70: an engine takes 25 s
# to start, and the headroom must carry the ramp meanwhile.
_AUTOSCALER = {"min_replicas": 0, "max_replicas": AUTOSCALE_MAX, "interval_s": 2.0,
               "warmup_s": 5.0, "scale_up_cooldown_s": 10.0, "scale_down_cooldown_s": 30.0,
               "scale_down_stabilization_s": 20.0, "scale_to_zero_after_s": 10.0,
               "kv_spare_trigger": 0.35}

# The saturation preset's table: the whole run, then the knee stage, then where the work went.
SATURATION_TABLE_COLUMNS: tuple[tuple[str, str, str, float, bool], ...] = (
    ("TTFT p50 s", "ttft_p50_s", ".3f", 1.0, True),
    ("TTFT p90 s", "ttft_p90_s", ".3f", 1.0, True),
    ("knee p50 s", "knee_ttft_p50_s", ".3f", 1.0, False),
    ("knee p90 s", "knee_ttft_p90_s", ".3f", 1.0, True),
    ("knee in tok/s", "knee_input_tok_s", ".0f", 1.0, True),
    ("knee out tok/s", "knee_output_tok_s", ".0f", 1.0, False),
    # The whole run, its drain included: every profile serves the same requests, so this is
    # the inverse of how long it took to serve them all (the knee's window also holds the
    # backlog a profile carried out of the first stage).
    ("in tok/s", "input_tok_s", ".0f", 1.0, True),
    ("hit %", "cache_hit_rate", ".1f", 100.0, True),
    ("spread CV", "load_spread", ".3f", 1.0, False),
    ("prefill max/mean", "prefill_max_over_mean", ".2f", 1.0, False),
    ("failed", "errors", "d", 1.0, True),
    ("CP CPU s/1k", "control_plane_cpu_s_per_1k", ".1f", 1.0, False),
)

PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        description="4 engines, 8 groups x 6 prompts of 1,000+200 tokens, 4 -> 16 QPS",
        workload=_quick_workload,
        stages=[W.Stage(4, 4), W.Stage(8, 4), W.Stage(16, 4)],
        # 1,200-token prompts at 16 QPS over 4 engines: random routing recomputes prefixes.
        system=SystemSpec(engines=4, num_gpu_blocks=2000, time_scale=1.0,
                          engine_args="--prefill-tokens-per-s 12000"),
    ),
    "llmd-kvcache-wins": Preset(
        name="llmd-kvcache-wins",
        description=("llm-d's precise prefix-cache benchmark scaled to this machine: 8 engines, "
                     "150 groups x 5 users, 6,000-token prefixes + 1,200-token questions, "
                     "Poisson 3 -> 60 QPS, working set ~73% of total KV"),
        workload=_llmd_workload,
        # A short ramp, then a long stretch at 60 QPS, where llm-d's random and approximate
        # routing fall behind (their TTFT tails come from the backlog that builds there).
        stages=[W.Stage(3, 4), W.Stage(15, 4), W.Stage(30, 4), W.Stage(45, 4),
                W.Stage(60, 30)],
        # Working set: 150 prefixes x 375 blocks = 56,250 blocks = 73% of 8 x 9,630. The
        # simulator runs at half speed (time_scale 2) so that at 60 modelled QPS the client,
        # ingress and services (30 requests/s of 7,200 tokens on 2 cores) do not saturate the
        # CPU and distort what is being measured: the engines' queues.
        # Prefill at 20k tok/s instead of the 8B calibration's 30k: llm-d's run served
        # Qwen3-32B, whose prefill costs several times an 8B's per token on its GPUs.
        system=SystemSpec(engines=8, num_gpu_blocks=9630, time_scale=2.0,
                          engine_args="--prefill-tokens-per-s 20000"),
        profiles=["random", "approx-prefix", "llm-d", "default"],
    ),
    "saturation": Preset(
        name="saturation",
        description=("cache affinity against load: 8 engines, 16 groups of 3,000-token prefixes "
                     "+ 500-token questions, Zipf(1.1) popularity (the hottest prefix 33% of "
                     "the requests: 2.6 engines' share), Poisson below, at and above the "
                     "fleet's knee"),
        workload=_saturation_workload,
        # The knee, from the simulator's model: a prompt whose prefix an engine holds costs
        # 500 / 4,000 s + 3,000 cached tokens x 3 us = 0.134 s of prefill (one at a time per
        # engine), 7.5 a second, 60 for the fleet if every prompt hit and the load were even;
        # a miss costs 3,500 / 4,000 = 0.875 s (6.5 hits). Less the 16 first misses and the
        # hottest prefix's copies, measured: TTFT p90 below 0.8 s up to 40 QPS and past 1.8 s
        # from 50 (docs/bench.md). Stages: 25 QPS (below; the prefixes' first misses fall
        # here), 45 (the knee), 60 (above: a backlog grows wherever routing sends it).
        stages=[W.Stage(25, 2.5), W.Stage(45, 2.5), W.Stage(60, 2)],
        # Prefill 4,000 tokens/s: a 70B-class model on one accelerator (so that the knee is at
        # tens of requests a second, not hundreds). 1,000 blocks an engine hold 5 prefixes;
        # the 16 (3,000 blocks) fit the fleet's 8,000, not one engine. Time scale 4: 60
        # modelled QPS are 15 a wall second, which 2 cores send and serve.
        system=SystemSpec(engines=8, num_gpu_blocks=1000, time_scale=4.0,
                          engine_args="--prefill-tokens-per-s 4000"),
        profiles=["random", "precise-prefix", "llm-d", "llm-d-sticky", "default"],
        knee_stage=1,
        table=SATURATION_TABLE_COLUMNS,
    ),
    "autoscale": Preset(
        name="autoscale",
        description=("a day in 8.5 minutes (modelled): idle, ramp, peak, trough, idle, on "
                     "engines that take 25 s to start; fixed max, fixed min and the "
                     "autoscaler (saturation, SLO) from zero"),
        workload=_autoscale_workload,
        # Night, morning ramp, midday peak, afternoon trough, night (modelled seconds).
        stages=[W.Stage(0, 90), W.Stage(0.1, 30), W.Stage(0.3, 30), W.Stage(0.6, 30),
                W.Stage(1.0, 30), W.Stage(1.4, 30), W.Stage(1.9, 90), W.Stage(0.5, 90),
                W.Stage(0, 90)],
        # A big model on a small accelerator: 4 sequences at once (the KV cache holds 4
        # requests of 200 + 20 tokens, 14 blocks each: usage = running / 4), prefill at 2,000
        # tok/s (0.1 s a prompt), 200 ms a token: ≈ 4 s a request, ≈ 1 request/s an engine.
        # The peak (1.9/s ≈ 8 sequences) needs 3-4 engines; one is overrun. Time scale 0.1:
        # the 8.5-minute day takes 51 s, an engine's start 2.5 s.
        # The agents scrape every 0.2 s (2 modelled s), so a started engine is seen ready soon.
        system=SystemSpec(engines=AUTOSCALE_MAX, num_gpu_blocks=56, time_scale=0.1,
                          engine_args="--max-num-seqs 4 --itl-s 0.2 --prefill-tokens-per-s 2000",
                          settings={"agent": {"scrape_interval_s": 0.2}}),
        profiles=["default"],
        fleets=[F.Fleet("fixed-max", AUTOSCALE_MAX), F.Fleet("fixed-min", 1),
                F.Fleet("autoscale-saturation", 0, {**_AUTOSCALER, "mode": "saturation"}),
                F.Fleet("autoscale-slo", 0, {**_AUTOSCALER, "mode": "slo",
                                             "ttft_p90_target_s": 1.0, "slo_window_s": 20.0})],
        startup_delay_s=VLLM_STARTUP_S,
    ),
    "pd": Preset(
        name="pd",
        description=("prefill/decode disaggregation on 4 engines: half 6,000-token prompts, half "
                     "300, 128 tokens out, 1.5 -> 3 QPS; all 4 aggregated, 2 prefill + 2 decode "
                     "always disaggregated, and the prefix-aware decider"),
        workload=_pd_workload,
        stages=[W.Stage(1.5, 20), W.Stage(3, 30)],
        # Half speed (time scale 2): 3 modelled QPS of 128 streamed tokens stay far from what
        # the client and ingress can push on 2 cores. Prefill at 12k tok/s (a 6,000-token
        # prompt: 0.5 s, during which the engine's decode steps take twice as long). No
        # start-up delay: fixed fleets.
        system=SystemSpec(engines=4, time_scale=2.0,
                          engine_args="--prefill-tokens-per-s 12000"),
        profiles=["default"],
        fleets=[F.Fleet("aggregated", 4),
                F.Fleet("disaggregated", 4, prefill=2, decode=2, profile="pd-always"),
                F.Fleet("prefix-aware", 4, prefill=2, decode=2, profile="default")],
        table=F.PD_TABLE_COLUMNS,
    ),
    "tiered": Preset(
        name="tiered",
        description=("KV tiers on 4 engines: 100 groups x 5 prompts (2,000-token system "
                     "prompts + 200) in rounds, a working set ~3x the fleet's GPU KV, 8 QPS "
                     "then 20 (near what 4 engines compute of misses); GPU-only caching, + a "
                     "CPU tier, + a shared storage tier, each routed by the default (precise) "
                     "profile"),
        workload=_tiered_workload,
        # 8 QPS for 25 s (the first two rounds), then 20 QPS for 15 s: 20 misses a second are
        # 44k tokens/s to compute, 92% of the fleet's 48k: where the tiers' hits show as
        # throughput and tails, not only as a shorter median.
        stages=[W.Stage(8, 25), W.Stage(20, 15)],
        # GPU: 1,000 blocks of 16 tokens an engine (4,000 in all; the working set is 100 x 138
        # blocks ≈ 13,800). CPU tier: 1,500 blocks an engine. Storage: one shared directory,
        # unbounded, at the simulator's modelled bandwidths (5 GB/s read, 1.5 GB/s write an
        # engine). Prefill 12k tokens/s: a 2,200-token miss costs 0.18 s, loading its 2,000
        # cached tokens (256 MB of KV at 128 KiB a token) from storage 0.05 s, from CPU 0.005 s.
        system=SystemSpec(engines=4, num_gpu_blocks=1000, time_scale=1.0,
                          engine_args="--prefill-tokens-per-s 12000"),
        profiles=["default"],
        fleets=[F.Fleet("gpu-only", 4),
                F.Fleet("gpu+cpu", 4, engine_args="--num-cpu-blocks 1500"),
                F.Fleet("gpu+cpu+storage", 4, engine_args="--num-cpu-blocks 1500",
                        storage=True)],
        table=F.TIERED_TABLE_COLUMNS,
    ),
    "tenants": Preset(
        name="tenants",
        description=("flow control under a flood on 4 engines: a heavy tenant at 3x what they "
                     "compute (a tenth interactive, priority 1; a tenth sheddable, -1), a light "
                     "tenant at 2 QPS, unique 1,000-token prompts; the light tenant alone, no "
                     "flow control, flow control first come first served, fair between tenants, "
                     "fair with priorities"),
        workload=T.workload,
        # The classes' nominal rates (tenants.RATES) for 15 s.
        stages=[W.Stage(1.0, 15)],
        # 4 engines computing 8,000 prompt tokens/s, one prefill at a time: 0.125 s a
        # 1,000-token prompt, 32 requests/s for the fleet; the heavy tenant sends 96. Quarter
        # speed (time scale 4): 25 requests/s of wall clock for the 2-core machine. An engine counts
        # as saturated with one prompt waiting for its prefill (the signal is off by default:
        # docs/flow-control.md). The threshold is half a prompt,
        # not a whole one: a never-seen prompt's count is the tokenizer's early estimate
        # (characters per token), a few percent either side of its 1,001 tokens, and at 1,000
        # the prompts estimated short left their engine "unsaturated" with a prefill running.
        system=SystemSpec(engines=4, time_scale=4.0,
                          engine_args="--prefill-tokens-per-s 8000",
                          settings={"ingress": {"saturation_uncached_tokens": 500}}),
        profiles=["default"],
        fleets=[F.Fleet(T.ALONE, 4, tags=("light",)),
                F.Fleet("no flow control", 4, settings={"ingress": {"flow_control": False}}),
                F.Fleet("flow fcfs", 4, settings={"ingress": {"flow_fairness": "off"}},
                        drop_headers=(T.PRIORITY,)),
                F.Fleet("flow fair", 4, drop_headers=(T.PRIORITY,)),
                F.Fleet("flow fair+priority", 4)],
        table=T.TABLE_COLUMNS,
        arrivals=T.arrivals,
        compare=T.compare,
    ),
}


def local_system(spec: SystemSpec, state_dir: Path) -> LocalSystem:
    """A cold system for one profile, as `infermesh up` runs it, on free ports; the ingress
    waits longer for the control plane than its defaults (a saturated 2-core machine). No
    fleet console: nobody watches it, and it would take CPU from what is measured."""
    settings = {"ingress": {"schedule_timeout_s": 2, "tokenize_timeout_s": 5},
                **spec.settings}
    return LocalSystem(plan(dataclasses.replace(spec, free_ports=True, state_dir=str(state_dir),
                                                settings=settings, console=False)))


async def run_requests(url: str, requests: list[W.BenchRequest], *, profile: str, model: str,
                       stages: list[W.Stage], header_profile: bool = True,
                       start: float | None = None,
                       ) -> tuple[list[M.RequestResult], float]:
    """Send every request at its arrival offset (wall seconds from ``start``, a
    ``time.perf_counter()`` moment; default: now); return results and duration. The run lasts
    at least through the stages (idle ones at the end included)."""
    headers = {"x-infermesh-profile": profile} if header_profile else {}
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
        start = time.perf_counter() if start is None else start
        tasks = []
        for req in requests:
            delay = start + req.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(
                http, url, req, model=model, profile=profile, run_start=start,
                offered_rate=W.rate_at(stages, req.arrival_s) or 0.0, headers=headers)))
        results = await asyncio.gather(*tasks)
        rest = start + W.total_duration(stages) - time.perf_counter()
        if rest > 0:
            await asyncio.sleep(rest)
        return list(results), time.perf_counter() - start


# What the summary repeats of the knee stage (``knee_<key>``), from :func:`metrics.by_stage`.
KNEE_KEYS = ("ttft_p50_s", "ttft_p90_s", "input_tok_s", "output_tok_s", "cache_hit_rate")


def peak_stage_output_tok_s(results: list[M.RequestResult], wall_stages: list[W.Stage],
                            time_scale: float) -> float:
    """Output tokens/s completed while the last (peak) stage's arrivals were coming in.

    The whole-run figure (``output_tok_s``) includes draining any backlog after the last
    arrival; this one is the throughput under the peak offered load, as per-stage reports of
    load generators give it.
    """
    if not wall_stages:
        return 0.0
    t1 = sum(s.duration_s for s in wall_stages)
    t0 = t1 - wall_stages[-1].duration_s
    tokens = sum(r.output_tokens for r in results
                 if r.ok and r.e2e_s is not None and t0 <= r.start_s + r.e2e_s <= t1)
    return tokens / (t1 - t0) * time_scale if t1 > t0 else 0.0



# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    """One line of the table: one of our profiles, one policy of a peer router, or a fleet."""

    name: str
    peer: P.PeerPlan | None = None
    policy: str = ""
    fleet: F.Fleet | None = None

    @property
    def kind(self) -> str:
        if self.fleet is not None:
            return "fleet"
        return "peer" if self.peer is not None else "profile"

    @property
    def folder(self) -> str:
        """Its log folder's name (no ``:``)."""
        return self.name.replace(":", "-")


@dataclass
class RowRun:
    """One repeat of one row."""

    summary: dict[str, Any]
    per_rate: list[dict[str, Any]]
    results: list[M.RequestResult]
    wall_s: float  # start of its system to its stop
    note: str | None = None
    replicas: list[dict[str, float]] | None = None  # fleets: the replicas over time


@dataclass(frozen=True)
class Workload:
    """What every row gets: the same requests at the same (wall-clock) moments."""

    requests: list[W.BenchRequest]
    wall_stages: list[W.Stage]
    time_scale: float
    model: str
    knee_stage: int | None = None


def _spread_from_counts(counts: dict[str, int]) -> dict[str, Any]:
    """``load_spread`` from per-engine request counts (population CV)."""
    values = list(counts.values())
    cv = None
    if values and sum(values) > 0:
        avg = sum(values) / len(values)
        cv = math.sqrt(sum((v - avg) ** 2 for v in values) / len(values)) / avg
    return {"per_endpoint": dict(sorted(counts.items())), "cv": cv}


def _measure(target: str, work: Workload, *, profile: str, header_profile: bool,
             meter: CpuMeter | None) -> tuple[list[M.RequestResult], float, dict[str, float]]:
    """Send every request to ``target``; the results, the wall duration and the CPU seconds
    (per meter group, and ``client``: this process) over the measured window."""
    client0 = self_cpu_s()
    if meter is not None:
        meter.start()
    results, duration = asyncio.run(run_requests(
        target, work.requests, profile=profile, model=work.model, stages=work.wall_stages,
        header_profile=header_profile))
    cpu: dict[str, float] = meter.stop() if meter is not None else {}
    cpu["client"] = self_cpu_s() - client0
    return results, duration, cpu


def _summarize(results: list[M.RequestResult], duration: float, work: Workload,
               cpu: dict[str, float], endpoints: Sequence[str] | None) -> dict[str, Any]:
    s = M.summarize(results, duration_s=duration, time_scale=work.time_scale,
                    endpoints=endpoints)
    s["peak_output_tok_s"] = peak_stage_output_tok_s(results, work.wall_stages,
                                                     work.time_scale)
    s["per_stage"] = M.by_stage(results, [(x.rate_qps, x.duration_s) for x in work.wall_stages],
                                work.time_scale)
    if work.knee_stage is not None:
        knee = s["per_stage"][work.knee_stage]
        for key in KNEE_KEYS:
            s[f"knee_{key}"] = knee[key]
    n = len(results)
    by_kind = {g[5:]: v for g, v in cpu.items() if g.startswith("kind:")}
    if by_kind:
        s["cpu_s_per_1k_by_kind"] = {k: v / n * 1000 if n else None for k, v in by_kind.items()}
    for group in ("control_plane", "engines", "client"):
        value = cpu.get(group)
        s[f"{group}_cpu_s"] = value
        s[f"{group}_cpu_s_per_1k"] = value / n * 1000 if value is not None and n else None
    return s


def run_profile(spec: SystemSpec, profile: str, work: Workload, state_dir: Path, *,
                url: str | None = None) -> RowRun:
    """One of our profiles on a fresh local system (or against ``url``)."""
    t0 = time.monotonic()
    system = None if url else local_system(spec, state_dir).start()
    try:
        meter = None
        if system is not None:
            procs = system.plan.processes
            groups: dict[str, list[int | None]] = {
                "control_plane": [system.proc(p.name).pid for p in procs if p.kind != "sim"],
                "engines": [system.proc(p.name).pid for p in procs if p.kind == "sim"]}
            # Where the control plane's CPU goes, per kind of process (cpu_by_kind).
            for p in procs:
                if p.kind != "sim":
                    groups.setdefault(f"kind:{p.kind}", []).append(system.proc(p.name).pid)
            meter = CpuMeter(groups)
        results, duration, cpu = _measure(url or (system.url if system else ""), work,
                                          profile=profile, header_profile=True, meter=meter)
    finally:
        if system is not None:
            system.stop()
            system.remove_secrets()
    summary = _summarize(results, duration, work, cpu,
                         list(system.plan.pods) if system is not None else None)
    return RowRun(summary=summary, per_rate=M.by_offered_rate(results, work.time_scale),
                  results=results, wall_s=time.monotonic() - t0)


def run_peer(spec: SystemSpec, peer: P.PeerPlan, policy: str, work: Workload,
             state_dir: Path) -> RowRun:
    """One peer router policy in front of a fresh fleet of the preset's simulated engines."""
    t0 = time.monotonic()
    fleet = P.SimFleet(spec, state_dir)
    router: P.PeerRouter | None = None
    try:
        fleet.start()
        router = P.PeerRouter(peer.peer, peer.executable, policy, fleet, model=work.model,
                              log_dir=fleet.plan.logs_dir).start()
        meter = CpuMeter({"control_plane": [router.pid],
                          "engines": [p.pid for p in fleet.procs()]})
        results, duration, cpu = _measure(router.url, work, profile=f"{peer.peer.name}:{policy}",
                                          header_profile=False, meter=meter)
        counts = fleet.request_counts()
        note = router.note()
    finally:
        if router is not None:
            router.stop()
        fleet.stop()
    summary = _summarize(results, duration, work, cpu, None)
    # The routers do not say which engine served: count at the engines instead.
    summary["load_spread"] = _spread_from_counts(counts)
    return RowRun(summary=summary, per_rate=M.by_offered_rate(results, work.time_scale),
                  results=results, wall_s=time.monotonic() - t0, note=note)


def run_fleet(spec: SystemSpec, fleet: F.Fleet, work: Workload, state_dir: Path, *,
              profile: str, startup_delay_s: float) -> RowRun:
    """One fleet on a fresh local system: a fixed number of engines, or the autoscaler from
    zero. Besides the usual summary: engine-seconds, replicas over time and the requests that
    arrived while no replica was ready."""
    t0 = time.monotonic()
    storage = state_dir / "kv-storage"
    fspec = F.fleet_spec(spec, fleet, work.time_scale, startup_delay_s, str(storage))
    system = local_system(fspec, state_dir).start()
    try:
        actuator = system.actuator
        results, duration, m0, samples = asyncio.run(_measure_fleet(system, fleet, work,
                                                                    profile))
        if actuator is not None:
            intervals = [F.running_intervals(list(slot.history)) for slot in actuator.slots]
            used = F.engine_seconds(intervals, m0, m0 + duration)
        else:
            used = fleet.engines * duration
        # Flow control's answers, from the ingress's metrics.
        tiers = asyncio.run(T.flow_counts(system.url))
        # Cache hits per tier and the storage tier's traffic, from the engines' own metrics.
        tiers |= S.summarize_tiers(S.tier_stats(
            [f"http://{system.plan.spec.host}:{p}" for p in system.plan.layout.engine_http]))
        if fleet.storage:
            urls = [f"http://{system.plan.spec.host}:{p}" for p in system.plan.layout.engine_http]
            tiers.update(S.summarize_files(S.file_stats(urls)))
            tiers["storage_files_MB"] = sum(
                f.stat().st_size for f in storage.rglob("*.kv")) / 1e6
    finally:
        system.stop()
        system.remove_secrets()
        shutil.rmtree(storage, ignore_errors=True)  # tens of thousands of small files
    scale = work.time_scale
    summary = _summarize(results, duration, work, {}, list(system.plan.pods))
    summary.update({
        "engines": fleet.engines, "autoscaled": fleet.autoscaled,
        "mode": (fleet.autoscaler or {}).get("mode"),
        "engine_seconds": used / scale, "engine_seconds_wall": used,
        "ready_mean": F.time_mean(samples, duration, "ready"),
        "started_mean": F.time_mean(samples, duration, "started"),
        "ready_max": max((x.ready for x in samples), default=None),
        "replicas": F.sparkline(samples, duration, fleet.max_engines or 1),
        **F.zero_stats(results, samples, scale),
        **tiers,
        **T.tag_stats(results, scale),
    })
    return RowRun(summary=summary, per_rate=M.by_offered_rate(results, scale), results=results,
                  wall_s=time.monotonic() - t0, replicas=F.series(samples, scale))


async def _measure_fleet(system: LocalSystem, fleet: F.Fleet, work: Workload, profile: str
                         ) -> tuple[list[M.RequestResult], float, float, list[F.Sample]]:
    """The requests, with the replicas sampled meanwhile; also the run's start on the
    monotonic clock (the actuator's)."""
    actuator = system.actuator
    prefix = Subjects(system.plan.spec.subject_prefix).prefix
    sampler = F.ReplicaSampler(
        system.nats_url, f"{prefix}.pod.{system.plan.spec.pool}.*",
        (lambda: sum(s.running for s in actuator.slots)) if actuator is not None
        else (lambda: fleet.engines), security=system.security())
    await sampler.connect(expect=len(system.plan.active_pods))
    start, m0 = time.perf_counter(), time.monotonic()
    sampler.begin(start)
    try:
        results, duration = await run_requests(
            system.url, T.requests_for(work.requests, fleet.tags, fleet.drop_headers),
            profile=profile, model=work.model, stages=work.wall_stages, start=start)
    finally:
        await sampler.stop()
    return results, duration, m0, sampler.samples


def compare_fleets(rep: dict[str, RowRun], baseline: str) -> None:
    """Each fleet's TTFT p90 and engine-seconds relative to the baseline's (same repeat)."""
    base = rep.get(baseline)
    if base is None:
        return
    b = base.summary
    for r in rep.values():
        s = r.summary
        for key, out in (("ttft_p90_s", "ttft_p90_vs_baseline"),
                         ("engine_seconds", "engine_seconds_vs_baseline")):
            s[out] = s[key] / b[key] if s.get(key) is not None and b.get(key) else None


def with_profiles_file(spec: SystemSpec, path: str | Path) -> SystemSpec:
    """``spec`` whose ingresses and scheduler read their profiles from ``path`` (checked now:
    a bad file stops the bench before any system starts, with the config's message)."""
    from infermesh.libs.scheduling.config import build_pipeline, read_pipeline_spec
    from infermesh.libs.scheduling.framework import Handle
    from infermesh.libs.scheduling.metrics import SchedulerMetrics

    full = str(Path(path).resolve())
    build_pipeline(read_pipeline_spec(full), Handle(SchedulerMetrics()))
    settings = {k: dict(v) for k, v in spec.settings.items()}
    for service in ("ingress", "scheduler"):
        settings.setdefault(service, {})["profiles_file"] = full
    return dataclasses.replace(spec, settings=settings)


def resolve_time_scale(preset: Preset, override: float | None) -> float:
    """The time scale of a run: ``override`` (``--time-scale``) or the preset's, whatever the
    target (a local system, a peer, or ``--url``)."""
    scale = preset.system.time_scale if override is None else override
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"time scale must be finite and > 0, got {scale}")
    return scale


def build_workload(preset: Preset, seed: int, time_scale: float, model: str) -> Workload:
    """The preset's seeded requests with their Poisson arrival moments, in wall seconds."""
    tok = ModelTokenizer.from_folder(ensure_model_folder())
    base = preset.workload(tok, seed)
    wall_stages = W.scale_time(preset.stages, time_scale)
    if preset.arrivals is not None:
        return Workload(requests=preset.arrivals(base, wall_stages, seed),
                        wall_stages=wall_stages, time_scale=time_scale, model=model)
    times = W.poisson_arrivals(wall_stages, seed)
    # More arrivals than prompts: cycle through the workload, as inference-perf does.
    requests = W.assign_arrivals(W.cycle_to(base, len(times)), times)
    return Workload(requests=requests, wall_stages=wall_stages, time_scale=time_scale,
                    model=model, knee_stage=preset.knee_stage)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run(preset: Preset, out: Path, *, profiles: list[str] | None = None, url: str | None = None,
        model: str = DEFAULT_MODEL_NAME, seed: int = 0, peers: Sequence[str] = (),
        peer_policies: Sequence[str] | None = None, repeat: int = 1,
        time_scale: float | None = None, startup_delay_s: float | None = None,
        profiles_file: str | Path | None = None,
        ) -> dict[str, Any]:
    """Run ``preset`` for each profile (``profiles``: the preset's when None; ``[]``: none) and
    each peer policy, or for each of its fleets, ``repeat`` times; write results.json,
    requests.json and plots into ``out``. ``profiles_file``: the scheduling profiles of the
    local systems (their ingresses and scheduler; default: the built-in ones), for candidates
    that are not shipped. Raises :class:`peers.PeerError` when a requested peer is not
    installed."""
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    if peers and url:
        raise ValueError("peers run in front of their own fleet; they cannot go with a url")
    if preset.fleets and (peers or url or profiles is not None):
        raise ValueError(f"{preset.name} compares fleets of its own: no profiles, peers or url")
    delay = preset.startup_delay_s if startup_delay_s is None else startup_delay_s
    if not (math.isfinite(delay) and delay >= 0):
        raise ValueError(f"startup delay must be finite and >= 0, got {delay}")
    scale = resolve_time_scale(preset, time_scale)
    spec = dataclasses.replace(preset.system, time_scale=scale)
    if profiles_file is not None:
        if url:
            raise ValueError("a profiles file configures the local systems; not with a url")
        spec = with_profiles_file(spec, profiles_file)
    plans = P.resolve(list(peers), list(peer_policies) if peer_policies else None,
                      spec.engines) if peers else []
    rows = [Row(p) for p in (preset.profiles if profiles is None else profiles)]
    if preset.fleets:
        rows = [Row(f.name, fleet=f) for f in preset.fleets]
    baseline = preset.baseline
    for pp in plans:
        for policy, why in pp.skipped.items():
            print(f"[bench] skipping {pp.peer.name}:{policy}: {why}", flush=True)
        rows += [Row(f"{pp.peer.name}:{policy}", pp, policy) for policy in pp.policies]
    if not rows:
        raise ValueError("nothing to run: no profile and no peer policy")
    out.mkdir(parents=True, exist_ok=True)
    disk: dict[str, Any] | None = None
    if any(f.storage for f in preset.fleets):
        # The disk under the storage tier, for its bandwidth to be read against.
        disk = S.dd_rates(out)
        print(f"[bench] disk (dd, {disk['dd_MB']:.0f} MB): write "
              f"{_fmt(disk.get('dd_write_MBps'), '.0f')} MB/s, read "
              f"{_fmt(disk.get('dd_read_MBps'), '.0f')} MB/s"
              f"{' (page cache)' if disk.get('dd_read_cached') else ''}", flush=True)
    work = build_workload(preset, seed, scale, model)
    started = time.monotonic()
    runs: list[dict[str, RowRun]] = []
    for k in range(repeat):
        rep: dict[str, RowRun] = {}
        logs = out / "logs" if repeat == 1 else out / "logs" / f"repeat-{k + 1}"
        for row in rows:
            tag = f" (repeat {k + 1}/{repeat})" if repeat > 1 else ""
            print(f"[bench] {preset.name}: {row.name}{tag}: {len(work.requests)} requests",
                  flush=True)
            if row.fleet is not None:
                r = run_fleet(spec, row.fleet, work, logs / row.folder,
                              profile=row.fleet.profile or preset.profiles[0],
                              startup_delay_s=delay)
            elif row.peer is None:
                r = run_profile(spec, row.name, work, logs / row.folder, url=url)
            else:
                r = run_peer(spec, row.peer, row.policy, work, logs / row.folder)
            rep[row.name] = r
            s = r.summary
            if row.fleet is not None:
                print(f"[bench]   ttft p50 {_fmt(s['ttft_p50_s'], '.3f')}s p90 "
                      f"{_fmt(s['ttft_p90_s'], '.3f')}s, failed {s['errors']}, engine-s "
                      f"{s['engine_seconds']:.0f}, ready {s['replicas']}, at zero "
                      f"{s['zero_arrivals']}; {r.wall_s:.0f} s", flush=True)
                continue
            print(f"[bench]   ttft p90 {_fmt(s['ttft_p90_s'], '.3f')}s, "
                  f"{s['output_tok_s']:.0f} tok/s (peak stage {s['peak_output_tok_s']:.0f}), "
                  f"hit rate {_fmt(s['cache_hit_rate'], '.2f')}, errors {s['errors']}, "
                  f"CPU s/1k requests: control plane "
                  f"{_fmt(s['control_plane_cpu_s_per_1k'], '.1f')}, engines "
                  f"{_fmt(s['engines_cpu_s_per_1k'], '.1f')}; {r.wall_s:.0f} s", flush=True)
            if work.knee_stage is not None:
                print(f"[bench]   knee stage: ttft p90 {_fmt(s['knee_ttft_p90_s'], '.3f')}s, "
                      f"{s['knee_input_tok_s']:.0f} input tok/s, prefill max/mean "
                      f"{_fmt(s['prefill_max_over_mean'], '.2f')}", flush=True)
            if r.note:
                print(f"[bench]   note: {r.note}", flush=True)
        if baseline is not None:
            compare_fleets(rep, baseline.name)
        if preset.compare is not None:
            preset.compare({n: r.summary for n, r in rep.items()})
        runs.append(rep)
    names = [row.name for row in rows]
    by_row = {n: [rep[n].summary for rep in runs] for n in names}
    notes = {n: sorted({note for rep in runs if (note := rep[n].note) is not None})
             for n in names}
    summaries = {n: R.median_summary(by_row[n]) for n in names}
    per_rate = {n: R.median_per_rate([rep[n].per_rate for rep in runs]) for n in names}
    kept_notes = {n: v for n, v in notes.items() if v}
    doc: dict[str, Any] = {
        "preset": preset.name, "description": preset.description, "seed": seed,
        "profiles_file": str(Path(profiles_file).resolve()) if profiles_file else None,
        "time_scale": scale, "url": url, "requests": len(work.requests),
        "stages": [{"rate_qps": s.rate_qps, "duration_s": s.duration_s} for s in preset.stages],
        "engines": spec.engines if not url else None,
        "repeat": repeat,
        "startup_delay_s": delay if preset.fleets else None,
        "fleets": {f.name: {"engines": f.engines, "autoscaler": dict(f.autoscaler or {}) or None,
                            "system": dataclasses.asdict(F.fleet_spec(spec, f, scale, delay))}
                   for f in preset.fleets},
        "baseline": baseline.name if baseline is not None else None,
        "disk": disk,
        "rows": names,
        "kinds": {row.name: row.kind for row in rows},
        # Every row (profiles and peer policies): the median over the repeats.
        "profiles": summaries,
        "per_rate": per_rate,
        "spread": {n: R.spread(by_row[n], R.SPREAD_KEYS + (
            tuple(f"knee_{k}" for k in KNEE_KEYS) if preset.knee_stage is not None else ()))
            for n in names},
        # Per load stage (metrics.by_stage), the median over the repeats.
        "per_stage": {n: R.median_per_rate([rep[n].summary.get("per_stage") or []
                                            for rep in runs]) for n in names},
        "knee_stage": preset.knee_stage,
        "repeats": [{"profiles": {n: rep[n].summary for n in names},
                     "per_rate": {n: rep[n].per_rate for n in names},
                     "wall_s": {n: rep[n].wall_s for n in names},
                     **({"replicas": {n: rep[n].replicas for n in names}}
                        if preset.fleets else {})} for rep in runs],
        "peers": {pp.peer.name: {"package": pp.peer.package, "version": pp.version,
                                 "executable": str(pp.executable), "policies": pp.policies,
                                 "skipped": pp.skipped} for pp in plans},
        "notes": kept_notes,
        "elapsed_s": time.monotonic() - started,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
    raw = {n: [{**r.__dict__, "repeat": k + 1} for k, rep in enumerate(runs)
               for r in rep[n].results] for n in names}
    (out / "requests.json").write_text(json.dumps(raw, default=str))
    plots = M.write_plots(summaries, per_rate, out)
    if preset.fleets:
        plots += _write_replicas(runs, names, preset, out)
        print(R.format_table(by_row, columns=preset.table or F.TABLE_COLUMNS))
        if preset.table is None:
            print(f"replicas: ready over the run (· none, ▁…█ up to "
                  f"{max(f.max_engines for f in preset.fleets)}); at zero: requests that "
                  "arrived with no replica ready; added s: their median TTFT minus the others'")
    else:
        print(R.format_table(by_row, **({"columns": preset.table} if preset.table else {})))
    for n, v in kept_notes.items():
        for note in v:
            print(f"note: {n}: {note}")
    for pp in plans:
        for policy, why in pp.skipped.items():
            print(f"skipped: {pp.peer.name}:{policy}: {why}")
    print(f"[bench] {len(rows)} rows x {repeat} in {doc['elapsed_s']:.0f} s; wrote "
          f"{out / 'results.json'} and {', '.join(str(p) for p in plots)}")
    return doc


def _write_replicas(runs: list[dict[str, RowRun]], names: list[str], preset: Preset,
                    out: Path) -> list[Path]:
    """replicas.csv (every repeat) and replicas.svg (the first repeat)."""
    rows: dict[str, list[dict[str, float]]] = {}
    for k, rep in enumerate(runs):
        for n in names:
            tag = n if len(runs) == 1 else f"{n}#{k + 1}"
            rows[tag] = rep[n].replicas or []
    first = {n: runs[0][n].replicas or [] for n in names}
    top = max(f.max_engines for f in preset.fleets)
    return [F.write_csv(rows, out / "replicas.csv"),
            F.write_svg(first, [(s.rate_qps, s.duration_s) for s in preset.stages],
                        out / "replicas.svg", top=top)]


# --------------------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _stages(text: str) -> list[W.Stage]:
    """``RATE:SECONDS[,RATE:SECONDS...]``: arrival stages (modelled requests a second, seconds)."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        rate, sep, seconds = item.partition(":")
        try:
            if not sep:
                raise ValueError
            r, d = float(rate), float(seconds)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"a stage is RATE:SECONDS (modelled requests a second and seconds), got "
                f"{item!r}") from None
        if not (math.isfinite(r) and r >= 0 and math.isfinite(d) and d > 0):
            raise argparse.ArgumentTypeError(
                f"a stage's rate must be >= 0 and its seconds > 0, got {item!r}")
        out.append(W.Stage(r, d))
    if not out:
        raise argparse.ArgumentTypeError("no stage given")
    return out


def with_stages(preset: Preset, stages: Sequence[W.Stage]) -> Preset:
    """``preset`` with other arrival stages; its knee stays the stage at the same index (none
    when there are fewer stages)."""
    knee = preset.knee_stage
    return dataclasses.replace(preset, stages=list(stages),
                               knee_stage=knee if knee is not None and knee < len(stages)
                               else None)


def _names(known: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
        bad = [x for x in items if x not in known]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(bad)} (known: {', '.join(known)})")
        if not items:
            raise argparse.ArgumentTypeError(f"no {what} given")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line of `infermesh bench`."""
    p = argparse.ArgumentParser(prog="infermesh bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--out", type=Path, default=Path(".bench"), help="output folder")
    p.add_argument("--profiles", default="", help="comma-separated profiles (default: the "
                   "preset's; 'none': only the peers)")
    p.add_argument("--peers", type=_names(sorted(P.PEERS), "peer"), default=[],
                   help="comma-separated peer routers to run too, each policy as a row, in "
                   f"front of the same simulated fleet ({', '.join(P.PEERS)}; "
                   f"{P.INSTALL_HINT})")
    p.add_argument("--peer-policies", type=_names(P.ALL_PEER_POLICIES, "peer policy"),
                   default=None, help="comma-separated peer policies to run (default: each "
                   f"peer's: {', '.join(P.ALL_PEER_POLICIES)}); one a peer lacks is skipped")
    p.add_argument("--repeat", type=_positive_int, default=1,
                   help="run the whole set (profiles and peers) N times, fresh systems each "
                   "time; the table gives the median and [min-max]")
    p.add_argument("--time-scale", type=_positive_float, default=None,
                   help="simulator time scale: arrival moments are scaled by it and latencies "
                   "divided by it, for local systems, peers and --url alike (default: the "
                   "preset's; 1 for a real engine behind --url)")
    p.add_argument("--url", default="", help="an OpenAI endpoint to measure instead of a local "
                   "system (profiles then only travel as a header)")
    p.add_argument("--startup-delay-s", type=_non_negative_float, default=None,
                   help="fleet presets (autoscale): the simulated engines' start, in modelled "
                   "seconds, scaled by the time scale (default: the preset's; autoscale: 25, "
                   "real vLLM's on the CPU machines)")
    p.add_argument("--profiles-file", type=Path, default=None,
                   help="scheduling profiles (YAML, docs/scheduler.md) for the local systems, "
                   "to compare candidates that are not shipped (default: the built-in ones)")
    p.add_argument("--stages", type=_stages, default=None,
                   help="arrival stages instead of the preset's: RATE:SECONDS,... (modelled "
                   "requests a second and seconds, Poisson; e.g. 25:2.5,45:8 holds the "
                   "saturation preset's knee for 8 s); a preset's knee stays the stage at its "
                   "index")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME)
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (errors exit 2 with argparse's usage line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.peers and args.url:
        parser.error("--peers starts its own fleet of simulated engines; it cannot go with "
                     "--url")
    if args.peer_policies and not args.peers:
        parser.error("--peer-policies needs --peers")
    fleets = bool(PRESETS[args.preset].fleets)
    if fleets and (args.peers or args.url or args.profiles):
        parser.error(f"--preset {args.preset} compares fleets (its rows): --profiles, --peers "
                     "and --url do not apply")
    if args.profiles_file is not None and args.url:
        parser.error("--profiles-file configures the local systems; it cannot go with --url")
    if args.startup_delay_s is not None and not fleets:
        parser.error("--startup-delay-s applies to fleet presets (autoscale)")
    if args.profiles.strip() == "none":
        args.profile_list = []
        if not args.peers:
            parser.error("--profiles none leaves nothing to run without --peers")
    else:
        args.profile_list = [x for x in args.profiles.split(",") if x] or None
    return args


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every system, fleet and router started gets stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    # The results are the output; the systems' own logs go to their state folders.
    configure_logging("bench", level=None if "INFERMESH_LOG_LEVEL" in os.environ else "warning")
    preset = PRESETS[args.preset]
    out = args.out / preset.name if args.out == Path(".bench") else args.out
    if args.stages:
        preset = with_stages(preset, args.stages)
    try:
        with _sigterm_as_interrupt():
            run(preset, out, profiles=args.profile_list, url=args.url or None,
                model=args.model, seed=args.seed, peers=args.peers,
                peer_policies=args.peer_policies, repeat=args.repeat,
                time_scale=args.time_scale, startup_delay_s=args.startup_delay_s,
                profiles_file=args.profiles_file)
    except ConfigError as e:
        print(f"infermesh bench: {e}", file=sys.stderr)
        return 2
    except P.PeerError as e:
        print(f"infermesh bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[bench] interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    return 0
