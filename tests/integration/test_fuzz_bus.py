"""Property-based fuzzing of every bus subject, with valid traffic flowing through the ingress.

One stack (2 simulated engines, every service with its /metrics) serves the module. For each
subject of ``proto/subjects.py`` hypothesis sends random bytes, MessagePack of wrong shapes and
structurally valid messages with absurd values:

* request subjects (tokenize, schedule, index.lookup, snapshot.<pod>, ``$SRV.*``) must answer
  within a timeout, with a reply of the right type or a structured error (the micro error
  headers) whose code is a 4xx or 503 (no engine), never a 500;
* publish subjects (kv.<pool>.<pod>, pod.<pool>.<pod>, req.<pool>, scale.<pool>) must leave every
  service alive and raise its bad-message counters. Valid-shaped KV events and heartbeats go to
  made-up pods only (they legitimately change the index); live pods' subjects get garbage.

Meanwhile valid completions keep going through the ingress, and a prompt whose prefix one pod
holds keeps landing on that pod; afterwards the index still names that pod for the prefix.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from infermesh.libs.bus import NatsServer, connect, settle
from infermesh.libs.process.ports import free_port_range
from infermesh.libs.process.process import Process
from infermesh.libs.process.ready import http_ok
from infermesh.proto import codec
from infermesh.proto.messages import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    LookupReply,
    LookupRequest,
    PodState,
    RequestEvent,
    ScaleDecision,
    ScaleDemand,
    ScheduleDecision,
    ScheduleRequest,
    Snapshot,
    SnapshotRequest,
    TokenizeReply,
    TokenizeRequest,
)
from infermesh.proto.subjects import Subjects

from ..conftest import ProcessManager
from .helpers import services_ready

MODEL = "infermesh/tiny-llama"
S = Subjects()
PODS = ("sim-0", "sim-1")
ANSWER_TIMEOUT = 5.0  # seconds: a request subject silent for longer hangs
ERR = "Nats-Service-Error-Code"
I64, U64 = 2**63 - 1, 2**64 - 1
T = TypeVar("T")


@dataclass
class BusStack:
    nats: NatsServer
    ingress_url: str
    procs: dict[str, Process]
    metrics: dict[str, str]  # service → its /metrics URL


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[BusStack]:
    """The whole system with each service's /metrics on a known port; all stopped at the end."""
    srv = NatsServer(max_payload=8 * 1024 * 1024)
    srv.start()
    pm = ProcessManager(tmp_path_factory.mktemp("fuzz-bus"), model_dir)
    try:
        _, info = pm.sim("--time-scale", "0.02", "--hash-seed", "0", engines=len(PODS))
        base = free_port_range(7)
        bus = ["--nats-url", srv.url]
        procs: dict[str, Process] = {}
        metrics: dict[str, str] = {}
        for i, (pod, eng) in enumerate(zip(PODS, info["engines"], strict=True)):
            procs[pod] = pm.agent(srv.url, eng, pod, "--http-port", str(base + i))
            metrics[pod] = f"http://127.0.0.1:{base + i}/metrics"
        for i, name in enumerate(("tokenizer", "indexer", "scheduler"), start=2):
            procs[name] = pm.service(name, *bus, "--http-port", str(base + i))
            metrics[name] = f"http://127.0.0.1:{base + i}/metrics"
        procs["console"] = pm.service("console", *bus, "--http-port", str(base + 6))
        metrics["console"] = f"http://127.0.0.1:{base + 6}/metrics"
        procs["ingress"] = pm.service("ingress", *bus, "--http-port", str(base + 5))
        url = f"http://127.0.0.1:{base + 5}"
        metrics["ingress"] = url + "/metrics"
        deadline = time.monotonic() + 60
        while (http_ok(url + "/health") or {}).get("pods") != len(PODS):
            assert procs["ingress"].alive(), procs["ingress"].tail()
            assert time.monotonic() < deadline, "stack not ready"
            time.sleep(0.05)
        asyncio.run(services_ready(srv.url))
        yield BusStack(srv, url, procs, metrics)
    finally:
        pm.stop_all()
        srv.stop()


# --------------------------------------------------------------------------- a loop thread


class Loop:
    """An event loop in a thread, so hypothesis's (sync) examples can drive the async bus."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


async def scrape(url: str) -> dict[str, float]:
    """Every sample of a /metrics page, by its full name with labels."""
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# --------------------------------------------------------------------------- strategies

ints = st.one_of(st.sampled_from([0, -1, 1, I64, -(2**63), U64, 2**32, -(2**31)]),
                 st.integers(-(2**63), U64))
odd_str = st.one_of(st.sampled_from(["", " ", "\x00", "a.b", "*", ">", "\u202e", "🙂" * 50,
                                     "x" * 10_000, "im.kv.>", "../"]), st.text(max_size=30))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([-1.0, 0.0, 1e308, -1e308]))
key_lists = st.one_of(st.lists(ints, max_size=20),
                      st.integers(0, 20_000).map(lambda n: list(range(n))))

# Any MessagePack value: the wrong shapes.
mp_values = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=20),
              st.binary(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=20,
)


def _mp(v: Any) -> bytes:
    return msgspec.msgpack.encode(v)


garbage = st.one_of(
    st.binary(max_size=300),
    mp_values.map(_mp),
    st.sampled_from([b"", b"\xc1", b"\x91" * 5000 + b"\xc0", b"\xdd\xff\xff\xff\xff",
                     b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"{}", b"null"]),
)


def _mutate(base: dict[str, Any], draw: st.DrawFn) -> bytes:
    """A message's map with one or two fields given values of any type (or dropped)."""
    d = dict(base)
    for name in draw(st.lists(st.sampled_from(sorted(d)), min_size=1, max_size=2)):
        if draw(st.booleans()):
            d[name] = draw(mp_values)
        else:
            d.pop(name, None)
    return _mp(d)


def wrong_shape(example: msgspec.Struct, undecodable: bool = False) -> st.SearchStrategy[bytes]:
    """``example`` with fields retyped or dropped; ``undecodable``: only what cannot decode.

    A mutation can leave a valid message (a dropped field with a default, an int for a
    float); on a live pod's subject that would legitimately change its state, so those
    subjects get the undecodable ones only.
    """
    base = msgspec.to_builtins(example)

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        return _mutate(base, draw)

    return build().filter(_breaks(type(example))) if undecodable else build()


def _breaks(kind: Any) -> Callable[[bytes], bool]:
    def broken(data: bytes) -> bool:
        try:
            codec.decode(data, kind)
        except codec.DecodeError:
            return True
        return False

    return broken


def undecodable(kind: Any) -> st.SearchStrategy[bytes]:
    """Garbage that does not decode as ``kind`` (an empty map, say, may decode)."""
    return garbage.filter(_breaks(kind))


# --------------------------------------------------------------------------- oracles


@dataclass
class Tally:
    sent: dict[str, int] = field(default_factory=dict)
    codes: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, subject: str, code: str) -> None:
        self.sent[subject] = self.sent.get(subject, 0) + 1
        c = self.codes.setdefault(subject, {})
        c[code] = c.get(code, 0) + 1


async def ask(nc: Client, subject: str, data: bytes, reply_type: Any, tally: Tally,
              key: str, allowed: frozenset[str] = frozenset({"400", "404"})) -> Any:
    """Request; the answer must be a ``reply_type`` or a structured error with an allowed code."""
    try:
        msg = await nc.request(subject, data, timeout=ANSWER_TIMEOUT)
    except NatsTimeout:
        raise AssertionError(f"{subject} hung on {data[:200]!r}") from None
    except NoRespondersError:
        assert "no_responders" in allowed, f"{subject}: no responders"
        tally.add(key, "no_responders")
        return None
    code = (msg.headers or {}).get(ERR)
    if code is not None:
        assert code in allowed, f"{subject}: {code} {msg.headers} for {data[:200]!r}"
        assert (msg.headers or {}).get("Nats-Service-Error"), msg.headers
        tally.add(key, code)
        return None
    tally.add(key, "ok")
    return codec.decode(msg.data, reply_type)


def fuzz(name: str, strategy: st.SearchStrategy[Any], n: int,
         body: Callable[[Any], None]) -> None:
    """Run ``body`` on ``n`` derandomized examples of ``strategy``."""

    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(x=strategy)
    def run(x: Any) -> None:
        body(x)

    run.__name__ = f"fuzz_{name}"
    run()


# --------------------------------------------------------------------------- valid traffic


class Traffic:
    """Valid completions through the ingress; a sticky prompt must land on its prefix's pod."""

    def __init__(self, url: str, sticky: list[int], home: str) -> None:
        self.url, self.sticky, self.home = url, sticky, home
        self.sent = 0
        self.failed: list[str] = []
        self.sticky_sent = 0
        self.misrouted: list[str] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        i = 0
        async with aiohttp.ClientSession() as http:
            while not self._stop.is_set():
                sticky = i % 2 == 0
                prompt: Any = self.sticky if sticky else f"valid traffic {i}"
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
                self.sent += 1
                try:
                    async with http.post(self.url + "/v1/completions", json=body,
                                         timeout=aiohttp.ClientTimeout(total=20)) as r:
                        data = await r.read()
                        if r.status != 200:
                            self.failed.append(f"{r.status} {data[:200]!r}")
                        elif sticky:
                            self.sticky_sent += 1
                            pod = r.headers.get("x-infermesh-endpoint", "")
                            if pod != self.home:
                                self.misrouted.append(f"request {i} went to {pod}")
                except (aiohttp.ClientError, TimeoutError) as e:
                    self.failed.append(repr(e))
                i += 1

    def stop(self) -> None:
        self._stop.set()


# --------------------------------------------------------------------------- the test


def test_fuzzed_bus_subjects_get_structured_errors_and_traffic_flows(stack: BusStack) -> None:
    loop = Loop()
    try:
        nc: Client = loop.run(connect(stack.nats.url, "fuzz"))
        try:
            _run_fuzz(stack, loop, nc)
        finally:
            loop.run(nc.close())
    finally:
        loop.close()


def _run_fuzz(stack: BusStack, loop: Loop, nc: Client) -> None:
    tally = Tally()

    # A prompt of 8 full blocks (block size 16) whose prefix one pod holds, seen by the index.
    sticky = [1000 + i for i in range(128)]

    async def warm() -> tuple[str, list[int]]:
        async with aiohttp.ClientSession() as http:
            async with http.post(stack.ingress_url + "/v1/completions",
                                 json={"model": MODEL, "prompt": sticky, "max_tokens": 1}) as r:
                assert r.status == 200, await r.text()
                home = r.headers["x-infermesh-endpoint"]
        tok = await ask(nc, S.tokenize, codec.encode(TokenizeRequest(
            model=MODEL, block_size=16, prompt=sticky)), TokenizeReply, Tally(), "warm")
        return home, tok.block_keys

    home, keys = loop.run(warm())
    assert len(keys) == 8

    async def held() -> int:
        r = await ask(nc, S.index_lookup, codec.encode(LookupRequest(
            model=MODEL, block_keys=keys, pods=[home])), LookupReply, Tally(), "check")
        return max([m.blocks for m in r.matches if m.pod == home], default=0)

    deadline = time.monotonic() + 20
    while loop.run(held()) < len(keys):
        assert time.monotonic() < deadline, "the index never learnt the sticky prompt"
        time.sleep(0.05)
    before = {svc: loop.run(scrape(url)) for svc, url in stack.metrics.items()}

    traffic = Traffic(stack.ingress_url, sticky, home)
    running = loop.spawn(traffic.run())
    try:
        _fuzz_requests(nc, loop, tally)
        _fuzz_publishes(nc, loop, tally)
    finally:
        traffic.stop()
        running.result(30)

    after = {svc: loop.run(scrape(url)) for svc, url in stack.metrics.items()}

    def rose(svc: str, sample: str) -> float:
        return after[svc].get(sample, 0.0) - before[svc].get(sample, 0.0)

    bad_requests = 'infermesh_bus_requests_total{endpoint="%s",outcome="bad_request",service="%s"}'
    print(f"\nbus fuzz: messages per subject {tally.sent}")
    print(f"answers per request subject {tally.codes}")
    print(f"valid requests sent={traffic.sent} failed={len(traffic.failed)}; sticky "
          f"sent={traffic.sticky_sent} misrouted={len(traffic.misrouted)}")
    counters = {
        "indexer kv": rose("indexer", 'infermesh_indexer_bad_messages_total{stream="kv"}'),
        "indexer pod": rose("indexer", 'infermesh_indexer_bad_messages_total{stream="pod"}'),
        "scheduler pod": rose("scheduler", 'infermesh_scheduler_bus_messages_total'
                              '{kind="pod_state",outcome="bad"}'),
        "scheduler req": rose("scheduler", 'infermesh_scheduler_bus_messages_total'
                              '{kind="request_event",outcome="bad"}'),
        "ingress pod": rose("ingress", 'infermesh_ingress_rejected_total{reason="bad_pod_state"}'),
        "tokenizer": rose("tokenizer", bad_requests % ("tokenize", "infermesh-tokenizer")),
        "scheduler schedule": rose("scheduler", bad_requests % ("schedule", "infermesh-scheduler")),
        **{f"console {kind}": rose("console", 'infermesh_console_bus_messages_total'
                                   f'{{kind="{kind}",outcome="bad"}}')
           for kind in ("pod_state", "request_event", "scale")},
        "agent snapshot": sum(rose(p, 'infermesh_agent_snapshots_total{outcome="bad_request"}')
                              for p in PODS),
    }
    print(f"bad-message counters rose by {counters}")

    for what, n in counters.items():
        assert n > 0, f"{what}: bad messages not counted ({counters})"
    for name, p in stack.procs.items():
        assert p.alive(), f"{name} died:\n{p.tail()}"
    # The console still draws what it read (absurd numbers included).
    state = http_ok(stack.metrics["console"].replace("/metrics", "/console/state"))
    assert state is not None and len(state["pods"]) >= len(PODS)
    assert "console_push_failed" not in stack.procs["console"].tail(10**6)
    assert traffic.sent > 0 and not traffic.failed, traffic.failed[:5]
    assert traffic.sticky_sent > 0 and not traffic.misrouted, traffic.misrouted[:5]
    assert loop.run(held()) == len(keys), "the live pod's prefix is no longer indexed"


def _fuzz_requests(nc: Client, loop: Loop, tally: Tally) -> None:
    # --- im.tokenize
    tok_valid = st.builds(
        TokenizeRequest, model=st.one_of(st.just(MODEL), odd_str),
        block_size=st.one_of(ints, st.just(16)),
        prompt=st.one_of(st.none(), odd_str, st.lists(ints, max_size=50)),
        messages=st.one_of(st.none(), st.lists(st.dictionaries(
            st.sampled_from(["role", "content", "name", "tool_calls"]), mp_values,
            max_size=3), max_size=3)),
        add_special_tokens=st.one_of(st.none(), st.booleans()),
        chat_template_kwargs=st.one_of(st.none(), st.dictionaries(st.text(max_size=5),
                                                                  mp_values, max_size=2)),
        tools=st.one_of(st.none(), st.lists(st.dictionaries(st.text(max_size=5), mp_values,
                                                            max_size=2), max_size=2)),
        lora_name=st.one_of(st.none(), odd_str), cache_salt=st.one_of(st.none(), odd_str),
    ).map(codec.encode)
    tok_base = TokenizeRequest(model=MODEL, block_size=16, prompt="hello")
    fuzz("tokenize", st.one_of(garbage, wrong_shape(tok_base), tok_valid), 80,
         lambda data: loop.run(ask(nc, S.tokenize, data, TokenizeReply, tally, "tokenize")))

    # --- im.schedule; every decision is closed with a finished event so load stays honest
    sched_valid = st.builds(
        ScheduleRequest, request_id=st.one_of(odd_str, st.uuids().map(str)),
        model=st.one_of(st.just(MODEL), odd_str), num_tokens=ints, block_keys=key_lists,
        pool=st.one_of(st.just("default"), odd_str),
        lora_name=st.one_of(st.none(), odd_str), session_id=st.one_of(st.none(), odd_str),
        profile=st.one_of(st.none(), odd_str), exclude=st.lists(odd_str, max_size=3),
        labels=st.dictionaries(odd_str, odd_str, max_size=3),
    ).map(codec.encode)

    async def schedule(data: bytes) -> None:
        d = await ask(nc, S.schedule, data, ScheduleDecision, tally, "schedule",
                      frozenset({"400", "404", "503"}))
        if d is not None:
            assert d.pod in PODS, d
            done = RequestEvent(kind="finished", request_id=d.request_id, pod=d.pod,
                                pool="default", model=MODEL, ts=time.time())
            await nc.publish(S.req("default"), codec.encode(done))

    sched_base = ScheduleRequest(request_id="r", model=MODEL, num_tokens=5)
    fuzz("schedule", st.one_of(garbage, wrong_shape(sched_base), sched_valid), 80,
         lambda data: loop.run(schedule(data)))

    # --- im.index.lookup
    lookup_valid = st.builds(
        LookupRequest, model=st.one_of(st.just(MODEL), odd_str), block_keys=key_lists,
        pods=st.one_of(st.none(), st.lists(st.one_of(st.sampled_from(PODS), odd_str),
                                           max_size=5)),
    ).map(codec.encode)
    fuzz("lookup", st.one_of(garbage, wrong_shape(LookupRequest(model=MODEL, block_keys=[1])),
                             lookup_valid), 60,
         lambda data: loop.run(ask(nc, S.index_lookup, data, LookupReply, tally, "lookup")))

    # --- im.snapshot.<pod> of live pods (the first part of the answer is checked) and of
    # made-up pods (no agent: "no responders" at once, never a hang).
    async def snapshot(case: tuple[str, bytes]) -> None:
        pod, data = case
        if pod in PODS:
            await ask(nc, S.kv_snapshot(pod), data, Snapshot, tally, "snapshot")
        else:
            await ask(nc, S.kv_snapshot(pod), data, Snapshot, tally, "snapshot",
                      frozenset({"no_responders"}))

    snap_valid = st.builds(SnapshotRequest, pod=st.one_of(st.sampled_from(PODS), odd_str),
                           max_blocks_per_part=ints).map(codec.encode)
    fuzz("snapshot", st.tuples(
        st.one_of(st.sampled_from(PODS), st.sampled_from(["ghost-0", "ghost-1"])),
        st.one_of(garbage, wrong_shape(SnapshotRequest(pod="sim-0")), snap_valid)), 60,
        lambda case: loop.run(snapshot(case)))

    # --- $SRV.PING / INFO / STATS (all, by service name): any payload gets a JSON answer
    async def srv(case: tuple[str, str, bytes]) -> None:
        verb, name, data = case
        subject = f"$SRV.{verb}" + (f".{name}" if name else "")
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(subject, data, reply=inbox)
        try:
            msg = await sub.next_msg(timeout=ANSWER_TIMEOUT)
        except NatsTimeout:
            raise AssertionError(f"{subject} did not answer {data[:100]!r}") from None
        finally:
            await sub.unsubscribe()
        assert isinstance(json.loads(msg.data), dict)
        tally.add(f"$SRV.{verb}", "ok")

    fuzz("srv", st.tuples(st.sampled_from(["PING", "INFO", "STATS"]),
                          st.sampled_from(["", *(f"infermesh-{svc}" for svc in (
                              "tokenizer", "indexer", "scheduler", "agent"))]), garbage),
         60, lambda case: loop.run(srv(case)))


def _fuzz_publishes(nc: Client, loop: Loop, tally: Tally) -> None:
    async def publish(subject: str, data: bytes, key: str) -> None:
        await nc.publish(subject, data)
        tally.add(key, "published")

    # --- im.kv.<pool>.<pod>: garbage to live pods, absurd but valid-shaped batches to ghosts
    events = st.lists(st.one_of(
        st.builds(BlockStored, block_hashes=key_lists, parent_hash=st.one_of(st.none(), ints),
                  token_ids=key_lists, block_size=ints,
                  tier=st.one_of(st.sampled_from(["GPU", "CPU", "SHARED_STORAGE"]), odd_str),
                  lora_name=st.one_of(st.none(), odd_str),
                  extra_keys=st.one_of(st.none(), st.lists(mp_values, max_size=3))),
        st.builds(BlockRemoved, block_hashes=key_lists, tier=odd_str),
        st.builds(AllBlocksCleared, tier=st.one_of(st.none(), odd_str)),
    ), max_size=4)
    ghost = st.sampled_from(["ghost-a", "ghost-b", "ghost-c"])
    batch = st.builds(KVEventBatch, pod=ghost, pool=st.sampled_from(["default", "fuzzpool"]),
                      epoch=st.sampled_from(["e1", "e2", ""]),
                      seq=st.sampled_from([0, -1, 1, 2, 3, I64, U64, -(2**63)]),
                      ts=floats, events=events, engine_seq=st.one_of(st.none(), ints),
                      model=st.one_of(st.just(MODEL), odd_str))
    kv_base = KVEventBatch(pod="sim-0", pool="default", epoch="e", seq=1, ts=0.0, events=[])

    kv_junk = st.one_of(undecodable(KVEventBatch), wrong_shape(kv_base, undecodable=True))

    async def kv(case: tuple[str, Any]) -> None:
        kind, x = case
        if kind == "ghost":
            await publish(S.kv(x.pool, x.pod), codec.encode(x), "kv.<ghost>")
        elif kind == "mismatch":  # a valid batch naming another pod than its subject
            await publish(S.kv("default", "ghost-z"), codec.encode(x), "kv.<mismatch>")
        else:
            pod, data = x
            await publish(S.kv("default", pod), data, "kv.<live>")

    fuzz("kv", st.one_of(
        st.tuples(st.just("ghost"), batch),
        st.tuples(st.just("mismatch"), batch),
        st.tuples(st.just("live"), st.tuples(st.sampled_from(PODS), kv_junk))), 100,
        lambda case: loop.run(kv(case)))

    # --- im.pod.<pool>.<pod>: garbage to live pods, absurd heartbeats of ghosts in another pool
    state = st.builds(
        PodState, pod=ghost, pool=st.just("fuzzpool"), model=st.one_of(st.just(MODEL), odd_str),
        url=odd_str, ts=floats, epoch=odd_str, kv_seq=ints, ready=st.booleans(),
        running=ints, waiting=ints, kv_usage=floats, block_size=ints, num_gpu_blocks=ints,
        max_model_len=ints, role=st.sampled_from(["both", "prefill", "decode"]),
        labels=st.dictionaries(odd_str, odd_str, max_size=3),
        adapters=st.lists(odd_str, max_size=3))
    pod_base = PodState(pod="sim-0", pool="default", model=MODEL, url="http://x", ts=0.0,
                        epoch="e", kv_seq=0)

    pod_junk = st.one_of(undecodable(PodState), wrong_shape(pod_base, undecodable=True))

    async def pod(case: tuple[str, Any]) -> None:
        kind, x = case
        if kind == "ghost":
            await publish(S.pod_state(x.pool, x.pod), codec.encode(x), "pod.<ghost>")
        else:
            name, data = x
            await publish(S.pod_state("default", name), data, "pod.<live>")

    fuzz("pod", st.one_of(
        st.tuples(st.just("ghost"), state),
        st.tuples(st.just("live"), st.tuples(st.sampled_from(PODS), pod_junk))), 100,
        lambda case: loop.run(pod(case)))

    # --- im.req.<pool>: events about made-up requests on made-up pods
    event = st.builds(RequestEvent, kind=st.sampled_from(["routed", "first_token", "finished"]),
                      request_id=odd_str, pod=st.one_of(ghost, st.just("")),
                      pool=st.sampled_from(["default", "fuzzpool"]), model=odd_str, ts=floats,
                      num_tokens=ints, block_keys=key_lists, ttft_s=st.one_of(st.none(), floats),
                      output_tokens=ints, cached_tokens=ints, status=odd_str)
    req_base = RequestEvent(kind="finished", request_id="r", pod="ghost-a", pool="default",
                            model=MODEL, ts=0.0)
    fuzz("req", st.one_of(event.map(codec.encode), garbage, wrong_shape(req_base)), 80,
         lambda data: loop.run(publish(S.req("default"), data, "req.<pool>")))

    # --- im.scale.<pool>
    scale = st.one_of(
        st.builds(ScaleDemand, pool=odd_str, model=odd_str, ts=floats, queued=ints,
                  in_flight=ints, rate_rps=floats),
        st.builds(ScaleDecision, pool=odd_str, model=odd_str, ts=floats,
                  target_replicas=ints, reason=odd_str),
    ).map(codec.encode)
    fuzz("scale", st.one_of(scale, garbage), 50,
         lambda data: loop.run(publish(S.scale("default"), data, "scale.<pool>")))
    loop.run(settle(nc))

