"""`infermesh bench`: one workload, several scheduler profiles, each on a cold system.

A preset fixes the workload (generator and parameters), the arrival stages (in modelled time),
the simulated fleet, and the profiles to compare. For every profile a fresh local system starts
(cold engines, empty index, no routing history), the same seeded requests arrive at the same
(time-scaled) moments, and every request is measured. Latencies are reported in modelled seconds:
a simulator at ``time_scale`` 0.25 runs four times faster than the GPU it models.

With ``--url`` the same requests go to any OpenAI endpoint instead (a bare vLLM, another router);
the profile then only travels as the ``x-infermesh-profile`` header.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from infermesh.libs.telemetry import configure_logging
from infermesh.libs.tinymodel import DEFAULT_MODEL_NAME, ensure_model_folder
from infermesh.libs.tokenization import ModelTokenizer
from infermesh.services.system.plan import plan
from infermesh.services.system.run import LocalSystem
from infermesh.services.system.spec import SystemSpec

from . import metrics as M
from . import workload as W
from .client import send

ALL_PROFILES = ["random", "round-robin", "load", "approx-prefix", "precise-prefix", "default"]


@dataclass
class Preset:
    """A named benchmark: workload, arrivals, fleet and profiles."""

    name: str
    description: str
    workload: Callable[[ModelTokenizer, int], list[W.BenchRequest]]
    stages: list[W.Stage]  # modelled time
    system: SystemSpec  # the fleet; ports, state folder and timeouts are the bench's
    profiles: list[str] = field(default_factory=lambda: list(ALL_PROFILES))


def _quick_workload(tok: ModelTokenizer, seed: int) -> list[W.BenchRequest]:
    return W.shared_prefix(tok, num_groups=8, prompts_per_group=6, system_prompt_len=1000,
                           question_len=200, output_len=24, seed=seed)


def _llmd_workload(tok: ModelTokenizer, seed: int) -> list[W.BenchRequest]:
    # llm-d "KV-Cache Wins You Can See": 150 groups x 5 users, 6,000-token shared prefixes,
    # 1,200-token questions. Output shortened (the engines' decode is modelled, not the point).
    return W.shared_prefix(tok, num_groups=150, prompts_per_group=5, system_prompt_len=6000,
                           question_len=1200, output_len=32, seed=seed)


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
        profiles=["random", "approx-prefix", "precise-prefix", "default"],
    ),
}


def local_system(spec: SystemSpec, state_dir: Path) -> LocalSystem:
    """A cold system for one profile, as `infermesh up` runs it, on free ports; the ingress
    waits longer for the control plane than its defaults (a saturated 2-core machine)."""
    settings = {"ingress": {"schedule_timeout_s": 2, "tokenize_timeout_s": 5},
                **spec.settings}
    return LocalSystem(plan(dataclasses.replace(spec, free_ports=True, state_dir=str(state_dir),
                                                settings=settings)))


async def run_requests(url: str, requests: list[W.BenchRequest], *, profile: str, model: str,
                       stages: list[W.Stage], header_profile: bool = True,
                       ) -> tuple[list[M.RequestResult], float]:
    """Send every request at its arrival offset (wall seconds); return results and duration."""
    headers = {"x-infermesh-profile": profile} if header_profile else {}
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
        start = time.perf_counter()
        tasks = []
        for req in requests:
            delay = start + req.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(
                http, url, req, model=model, profile=profile, run_start=start,
                offered_rate=W.rate_at(stages, req.arrival_s) or 0.0, headers=headers)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


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


def run(preset: Preset, out: Path, *, profiles: list[str] | None = None, url: str | None = None,
        model: str = DEFAULT_MODEL_NAME, seed: int = 0) -> dict[str, Any]:
    """Run ``preset`` for each profile; write results.json and plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tok = ModelTokenizer.from_folder(ensure_model_folder())
    scale = 1.0 if url else preset.system.time_scale
    base = preset.workload(tok, seed)
    wall_stages = W.scale_time(preset.stages, scale)
    times = W.poisson_arrivals(wall_stages, seed)
    # More arrivals than prompts: cycle through the workload, as inference-perf does.
    requests = W.assign_arrivals(W.cycle_to(base, len(times)), times)
    summaries: dict[str, dict[str, Any]] = {}
    per_rate: dict[str, Any] = {}
    raw: dict[str, list[dict[str, Any]]] = {}
    for profile in profiles or preset.profiles:
        print(f"[bench] {preset.name}: profile {profile}: {len(requests)} requests", flush=True)
        system = None if url else local_system(preset.system, out / "logs" / profile).start()
        try:
            target = url or (system.url if system else "")
            results, duration = asyncio.run(run_requests(
                target, requests, profile=profile, model=model, stages=wall_stages))
        finally:
            if system is not None:
                system.stop()
                system.remove_secrets()
        summaries[profile] = M.summarize(results, duration_s=duration, time_scale=scale)
        summaries[profile]["peak_output_tok_s"] = peak_stage_output_tok_s(
            results, wall_stages, scale)
        per_rate[profile] = M.by_offered_rate(results, time_scale=scale)
        raw[profile] = [r.__dict__ for r in results]
        s = summaries[profile]
        print(f"[bench]   ttft p90 {s['ttft_p90_s']:.3f}s, {s['output_tok_s']:.0f} tok/s "
              f"(peak stage {s['peak_output_tok_s']:.0f}), hit rate {s['cache_hit_rate']:.2f}, "
              f"errors {s['errors']}", flush=True)
    doc = {
        "preset": preset.name, "description": preset.description, "seed": seed,
        "time_scale": scale, "url": url, "requests": len(requests),
        "stages": [{"rate_qps": s.rate_qps, "duration_s": s.duration_s} for s in preset.stages],
        "engines": preset.system.engines if not url else None,
        "profiles": summaries, "per_rate": per_rate,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
    (out / "requests.json").write_text(json.dumps(raw, default=str))
    plots = M.write_plots(summaries, per_rate, out)
    print(M.format_table(summaries))
    print(f"[bench] wrote {out / 'results.json'} and {', '.join(str(p) for p in plots)}")
    return doc


def build_parser() -> argparse.ArgumentParser:
    """The command line of `infermesh bench`."""
    p = argparse.ArgumentParser(prog="infermesh bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--out", type=Path, default=Path(".bench"), help="output folder")
    p.add_argument("--profiles", default="", help="comma-separated profiles (default: preset's)")
    p.add_argument("--url", default="", help="an OpenAI endpoint to measure instead of a local "
                   "system (profiles then only travel as a header)")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    # The results are the output; the systems' own logs go to their state folders.
    configure_logging("bench", level=None if "INFERMESH_LOG_LEVEL" in os.environ else "warning")
    preset = PRESETS[args.preset]
    profiles = [x for x in args.profiles.split(",") if x] or None
    run(preset, args.out / preset.name if args.out == Path(".bench") else args.out,
        profiles=profiles, url=args.url or None, model=args.model, seed=args.seed)
    return 0
