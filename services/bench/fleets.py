"""Fleet rows (the ``autoscale`` preset): the same day of load on fixed fleets and on the
autoscaler, with what each costs.

A :class:`Fleet` is one row: a fixed number of engines, or the autoscaler (its mode and knobs)
in front of engine slots that start parked, so the pool is at zero when the load begins. Every
row routes with our default profile; what differs is how many engines serve and when. While the
requests run, a :class:`ReplicaSampler` counts the ready pods (from their heartbeats) and the
started engine slots; afterwards the pure functions here turn the samples and the actuator's slot
histories into engine-seconds (the cost), the replicas over time (CSV, SVG and a text sparkline)
and the requests that arrived while no replica was ready.

Time: the autoscaler's and the ingress's knobs are given in modelled seconds (as the stages are)
and scaled to the wall clock by the time scale, like every delay of the simulator, its start-up
included. Engine-seconds are reported in modelled seconds (wall ÷ time scale).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from infermesh.libs.bus import ClientSecurity, connect
from infermesh.proto import codec
from infermesh.proto.messages import PodState
from infermesh.services.system.spec import SystemSpec

from . import metrics as M

# The autoscaler's knobs that are durations: given in modelled seconds, scaled to the wall clock.
# (Liveness — pod_timeout_s, pod_late_s, demand_timeout_s — is about the bus, not the model.)
AUTOSCALER_TIME_KNOBS = frozenset({
    "interval_s", "warmup_s", "scale_up_cooldown_s", "scale_down_cooldown_s",
    "scale_down_stabilization_s", "scale_to_zero_after_s", "ttft_p90_target_s",
    "itl_p90_target_s", "slo_window_s",
})
# How often the replicas are counted (wall seconds), and how fresh a heartbeat must be for its
# pod to count as ready (a stopped engine's agent falls silent).
SAMPLE_S = 0.25
FRESH_S = 1.0
SPARK = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class Fleet:
    """One row of a fleet comparison."""

    name: str
    engines: int  # started with the system; with the autoscaler the pool starts here (0: zero)
    autoscaler: Mapping[str, Any] | None = None  # its knobs, durations modelled; None: fixed
    # Prefill/decode pools (the `pd` preset): this many prefill and decode engines in place of
    # `engines` (which must be their sum), and the profile the row routes with (None: the
    # preset's first).
    prefill: int = 0
    decode: int = 0
    profile: str | None = None
    # More simulator arguments for this row's engines (the `tiered` preset: a CPU tier), and
    # whether they share a storage tier (a fresh directory in the row's state folder).
    engine_args: str = ""
    storage: bool = False
    # Service settings of this row over the preset's ({"ingress": {"flow_control": False}}),
    # the request classes it sends (BenchRequest.tag; empty: all) and the request headers it
    # leaves out (the `tenants` preset).
    settings: Mapping[str, Mapping[str, Any]] | None = None
    tags: tuple[str, ...] = ()
    drop_headers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.prefill or self.decode) and self.engines != self.prefill + self.decode:
            raise ValueError(f"fleet {self.name}: engines must be prefill + decode")

    @property
    def autoscaled(self) -> bool:
        """Whether the autoscaler decides this row's engines."""
        return self.autoscaler is not None

    @property
    def max_engines(self) -> int:
        """The most engines this row may run."""
        if self.autoscaler is None:
            return self.engines
        return int(self.autoscaler.get("max_replicas", 8))


def autoscaler_settings(knobs: Mapping[str, Any], time_scale: float) -> dict[str, Any]:
    """The autoscaler's settings on the wall clock: durations × ``time_scale``."""
    return {k: (v * time_scale if k in AUTOSCALER_TIME_KNOBS and v is not None else v)
            for k, v in knobs.items()}


def hold_s(startup_delay_s: float) -> float:
    """How long (modelled) an ingress holds a request while no engine is ready: past an
    engine's start, with room for the autoscaler to notice and the agent to say ready."""
    return 2 * startup_delay_s + 30


def fleet_spec(base: SystemSpec, fleet: Fleet, time_scale: float,
               startup_delay_s: float, storage_dir: str = "<state>/kv-storage") -> SystemSpec:
    """The system of one row: the preset's, with this row's engines, engine arguments (and
    shared storage in ``storage_dir``), the simulator's start-up delay and, when autoscaled, the
    autoscaler and an ingress that holds requests at zero."""
    settings = {k: dict(v) for k, v in base.settings.items()}
    for service, knobs in (fleet.settings or {}).items():
        settings[service] = {**settings.get(service, {}), **knobs}
    settings.setdefault("sim", {})["startup_delay_s"] = startup_delay_s
    args = " ".join(a for a in (base.engine_args, fleet.engine_args,
                                f"--storage-dir {storage_dir}" if fleet.storage else "") if a)
    base = dataclasses.replace(base, engine_args=args)
    if fleet.autoscaler is None:
        return dataclasses.replace(base, engines=fleet.engines, autoscale=False,
                                   prefill=fleet.prefill, decode=fleet.decode,
                                   time_scale=time_scale, settings=settings)
    settings["autoscaler"] = {**settings.get("autoscaler", {}),
                              **autoscaler_settings(fleet.autoscaler, time_scale)}
    ingress = settings.setdefault("ingress", {})
    ingress.setdefault("no_pod_wait_s", hold_s(startup_delay_s) * time_scale)
    return dataclasses.replace(base, engines=fleet.engines, autoscale=True,
                               time_scale=time_scale, settings=settings)


# --------------------------------------------------------------------------- accounting


@dataclass(frozen=True)
class Sample:
    """The replicas at one moment (wall seconds since the run's start)."""

    t: float
    ready: int  # pods whose last heartbeat, fresh, said ready
    started: int  # engine slots started and not stopped yet (booting and draining included)


def running_intervals(history: Sequence[tuple[float, str]]) -> list[tuple[float, float]]:
    """A slot's running intervals from its actuator history ``(when, what)``: from each
    ``started`` to the next ``stopped…``; one still running ends at +inf. A slot costs while it
    boots and while it drains."""
    out: list[tuple[float, float]] = []
    since: float | None = None
    for when, what in history:
        if what == "started" and since is None:
            since = when
        elif what.startswith("stopped") and since is not None:
            out.append((since, when))
            since = None
    if since is not None:
        out.append((since, math.inf))
    return out


def engine_seconds(intervals: Sequence[Sequence[tuple[float, float]]], t0: float,
                   t1: float) -> float:
    """Engine-seconds within ``[t0, t1]``: each slot's running time clipped to the window."""
    return math.fsum(max(0.0, min(b, t1) - max(a, t0)) for slot in intervals for a, b in slot)


def value_at(samples: Sequence[Sample], t: float) -> Sample | None:
    """The last sample at or before ``t`` (None before the first)."""
    lo, hi = 0, len(samples)
    while lo < hi:
        mid = (lo + hi) // 2
        if samples[mid].t <= t:
            lo = mid + 1
        else:
            hi = mid
    return samples[lo - 1] if lo else None


def time_mean(samples: Sequence[Sample], t_end: float, key: str = "ready") -> float | None:
    """The time-weighted mean of ``key`` over ``[first sample, t_end]`` (step function)."""
    if not samples or t_end <= samples[0].t:
        return None
    total = 0.0
    for cur, nxt in zip(samples, [*samples[1:], None], strict=True):
        end = min(nxt.t if nxt is not None else t_end, t_end)
        if end > cur.t:
            total += getattr(cur, key) * (end - cur.t)
    return total / (t_end - samples[0].t)


def at_zero(results: Sequence[M.RequestResult], samples: Sequence[Sample]
            ) -> tuple[list[M.RequestResult], list[M.RequestResult]]:
    """The requests that arrived while no replica was ready, and the others."""
    zero: list[M.RequestResult] = []
    rest: list[M.RequestResult] = []
    for r in results:
        s = value_at(samples, r.start_s)
        (zero if s is not None and s.ready == 0 else rest).append(r)
    return zero, rest


def zero_stats(results: Sequence[M.RequestResult], samples: Sequence[Sample],
               time_scale: float) -> dict[str, Any]:
    """The requests that arrived at zero ready replicas: how many, their TTFTs (modelled s),
    and the latency they added: their median TTFT minus the median TTFT of the others."""
    zero, rest = at_zero(results, samples)
    ttft = sorted(r.ttft_s / time_scale for r in zero if r.ok and r.ttft_s is not None)
    others = [r.ttft_s / time_scale for r in rest if r.ok and r.ttft_s is not None]
    p50 = M.percentile(ttft, 50)
    rest50 = M.percentile(others, 50)
    return {"zero_arrivals": len(zero), "zero_failed": sum(not r.ok for r in zero),
            "zero_ttft_s": ttft, "zero_ttft_p50_s": p50,
            "zero_ttft_max_s": ttft[-1] if ttft else None,
            "zero_added_s": None if p50 is None or rest50 is None else p50 - rest50}


def sparkline(samples: Sequence[Sample], t_end: float, top: int, width: int = 24) -> str:
    """Ready replicas over ``[0, t_end]`` in ``width`` characters: the most ready in each
    slice, ``·`` for none, ``▁``…``█`` up to ``top``."""
    if not samples or t_end <= 0 or top <= 0:
        return ""
    out = []
    for i in range(width):
        a, b = t_end * i / width, t_end * (i + 1) / width
        first = value_at(samples, a)
        inside = [s.ready for s in samples if a < s.t < b]
        n = max([first.ready if first is not None else 0, *inside])
        out.append("·" if n <= 0 else SPARK[min(len(SPARK) - 1,
                                                 math.ceil(n / top * len(SPARK)) - 1)])
    return "".join(out)


def series(samples: Sequence[Sample], time_scale: float) -> list[dict[str, float]]:
    """The samples as JSON-ready rows, time in modelled seconds."""
    return [{"t_s": round(s.t / time_scale, 3), "ready": s.ready, "started": s.started}
            for s in samples]


# --------------------------------------------------------------------------- sampling


@dataclass
class ReplicaSampler:
    """Counts a pool's ready pods (heartbeats) and started slots every ``SAMPLE_S``."""

    nats_url: str
    subject: str  # the pool's heartbeats
    started: Callable[[], int]  # engine slots started now
    security: ClientSecurity | None = None
    samples: list[Sample] = field(default_factory=list)
    _seen: dict[str, tuple[float, bool]] = field(default_factory=dict)  # pod → (heard, ready)
    _nc: Any = None
    _task: asyncio.Task[None] | None = None

    async def connect(self, expect: int, timeout: float = 10.0) -> None:
        """Subscribe, and wait until ``expect`` pods have said ready (a fixed fleet's)."""
        self._nc = await connect(self.nats_url, "bench-replicas", security=self.security)
        await self._nc.subscribe(self.subject, cb=self._on_pod)
        deadline = time.monotonic() + timeout
        while self.ready_now() < expect and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _on_pod(self, msg: Any) -> None:
        try:
            st = codec.decode(msg.data, PodState)
        except codec.DecodeError:
            return
        self._seen[st.pod] = (time.monotonic(), st.ready)

    def ready_now(self) -> int:
        """Pods heard from within ``FRESH_S`` whose last heartbeat said ready."""
        now = time.monotonic()
        return sum(1 for heard, ready in self._seen.values() if ready and now - heard < FRESH_S)

    def begin(self, start: float) -> None:
        """Sample from now on, ``t`` relative to ``start`` (``time.perf_counter()``)."""

        async def loop() -> None:
            while True:
                self.samples.append(Sample(time.perf_counter() - start, self.ready_now(),
                                           self.started()))
                await asyncio.sleep(SAMPLE_S)

        self._task = asyncio.create_task(loop(), name="bench-replicas")

    async def stop(self) -> None:
        """Stop sampling and close the connection."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._nc is not None:
            await self._nc.close()


# --------------------------------------------------------------------------- outputs


def write_csv(by_row: Mapping[str, Sequence[Mapping[str, float]]], path: Path) -> Path:
    """``row,t_s,ready,started`` for every row's replica series (modelled seconds)."""
    lines = ["row,t_s,ready,started"]
    for name, rows in by_row.items():
        lines += [f"{name},{r['t_s']},{r['ready']},{r['started']}" for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def write_svg(by_row: Mapping[str, Sequence[Mapping[str, float]]],
              stages: Sequence[tuple[float, float]], path: Path, *, top: int) -> Path:
    """Replicas over time, one panel per row: ready replicas (solid), started slots (dashed),
    the offered rate shaded behind (``stages``: (rate, duration) in modelled units)."""
    w, h, left, right, gap = 760, 120, 60, 20, 28
    end = max([sum(d for _, d in stages),
               *(r[-1]["t_s"] for r in by_row.values() if r)]) or 1.0
    top = max(top, 1)
    max_rate = max((r for r, _ in stages), default=0.0) or 1.0
    height = gap + len(by_row) * (h + gap) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="16" font-size="13">Replicas over time (modelled s); '
           'solid: ready, dashed: started; grey: offered rate</text>']

    def x(t: float) -> float:
        return left + (w - left - right) * t / end

    for i, (name, rows) in enumerate(by_row.items()):
        y0 = gap + i * (h + gap) + h  # the panel's bottom

        def y(v: float, y0: float = y0) -> float:
            return y0 - h * v / top

        color = COLORS[i % len(COLORS)]
        out.append(f'<text x="{left}" y="{y0 - h - 4}" fill="{color}">{escape(name)}</text>')
        t = 0.0
        pts = [f"{x(0):.1f},{y0:.1f}"]
        for rate, dur in stages:
            level = y0 - h * rate / max_rate
            pts += [f"{x(t):.1f},{level:.1f}", f"{x(t + dur):.1f},{level:.1f}"]
            t += dur
        pts.append(f"{x(t):.1f},{y0:.1f}")
        out.append(f'<polygon points="{" ".join(pts)}" fill="#eeeeee"/>')
        out.append(f'<line x1="{left}" y1="{y0}" x2="{w - right}" y2="{y0}" stroke="#999"/>')
        for v in range(top + 1):
            out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v}</text>')
        for key, dash in (("started", ' stroke-dasharray="4 3"'), ("ready", "")):
            steps: list[str] = []
            prev: float | None = None
            for r in rows:
                if prev is not None:
                    steps.append(f"{x(r['t_s']):.1f},{y(prev):.1f}")
                steps.append(f"{x(r['t_s']):.1f},{y(r[key]):.1f}")
                prev = r[key]
            if steps:
                out.append(f'<polyline points="{" ".join(steps)}" fill="none" '
                           f'stroke="{color}" stroke-width="1.5"{dash}/>')
    axis = gap + len(by_row) * (h + gap) + 4
    for k in range(6):
        t = end * k / 5
        out.append(f'<text x="{x(t):.1f}" y="{axis}" text-anchor="middle">{t:.0f}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")
    return path


# The table of the `pd` preset: what disaggregation trades (TTFT for a steady ITL).
PD_TABLE_COLUMNS: tuple[tuple[str, str, str, float, bool], ...] = (
    ("TTFT p50 s", "ttft_p50_s", ".3f", 1.0, True),
    ("TTFT p90 s", "ttft_p90_s", ".3f", 1.0, True),
    ("ITL p50 ms", "itl_p50_s", ".1f", 1000.0, True),
    ("ITL p99 ms", "itl_p99_s", ".1f", 1000.0, True),
    ("out tok/s", "output_tok_s", ".0f", 1.0, True),
    ("failed", "errors", "d", 1.0, True),
)

TIERED_TABLE_COLUMNS: tuple[tuple[str, str, str, float, bool], ...] = (
    ("TTFT p50 s", "ttft_p50_s", ".3f", 1.0, True),
    ("TTFT p90 s", "ttft_p90_s", ".3f", 1.0, True),
    ("peak tok/s", "peak_output_tok_s", ".0f", 1.0, True),
    ("hit GPU", "hit_gpu", ".2f", 1.0, False),
    ("hit CPU", "hit_cpu", ".2f", 1.0, False),
    ("hit storage", "hit_storage", ".2f", 1.0, False),
    ("hit all", "hit_total", ".2f", 1.0, True),
    ("files", "files_written", ".0f", 1.0, False),
    ("file wr MB/s", "files_write_MBps", ".0f", 1.0, False),
    ("file rd MB/s", "files_read_MBps", ".0f", 1.0, False),
    ("failed", "errors", "d", 1.0, True),
)

# The table of a fleet comparison: header, summary key, format, multiplier, spread shown
# (services/bench/repeats.py prints it).
TABLE_COLUMNS: tuple[tuple[str, str, str, float, bool], ...] = (
    ("TTFT p50 s", "ttft_p50_s", ".3f", 1.0, True),
    ("TTFT p90 s", "ttft_p90_s", ".3f", 1.0, True),
    ("p90 vs base", "ttft_p90_vs_baseline", ".2f", 1.0, False),
    ("failed", "errors", "d", 1.0, True),
    ("engine-s", "engine_seconds", ".0f", 1.0, True),
    ("cost vs base", "engine_seconds_vs_baseline", ".2f", 1.0, False),
    ("ready mean", "ready_mean", ".2f", 1.0, False),
    ("at zero", "zero_arrivals", "d", 1.0, False),
    ("added s", "zero_added_s", ".1f", 1.0, False),
    ("replicas (ready)", "replicas", "s", 1.0, False),
)
