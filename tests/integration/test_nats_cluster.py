"""A 3-node NATS cluster: one node is killed under load and no request is lost.

The worst case is forced: the ingress, the scheduler and agent ``sim-0`` are given only node 0's
URL (they learn the other nodes from the cluster's gossip), so killing node 0 cuts all three at
once; the tokenizer, the indexer and agent ``sim-1`` get every URL, in different orders, and sit
wherever nats-py's shuffle puts them. While ~200 requests (streamed and not, shared prefixes)
flow through the ingress at concurrency 4, node 0 is SIGKILLed. Checks: every request succeeds;
every client shows up on a surviving node's ``/connz`` by itself; the scheduler decides again;
the index equals a brute force over the engines' caches; a repeated prefix goes to the pod that
holds it; node 0 restarts on its ports and the cluster re-forms. The figures (sent / failed /
recovered, time to recover) are printed (``pytest -s``).

A tokenize request lost in the cut is asked again, so the request keeps its block keys; and a
second test runs ``infermesh up --nats-cluster 3``, kills one node and sees the launcher
bring it back on the same ports.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from infermesh.libs import kvblock
from infermesh.libs.bus import NatsCluster, connect, request, settle
from infermesh.libs.process.ports import free_port, free_port_range
from infermesh.proto import codec
from infermesh.proto.messages import LookupReply, LookupRequest, TokenizeReply

from .helpers import SIM_BLOCK_SIZE, infermesh_up, random_prompt, services_ready, wait_until
from .test_indexer import converged, metrics, read_caches
from .test_ingress import World

MODEL = "infermesh/tiny-llama"
BS = SIM_BLOCK_SIZE
REQUESTS = 200
CONCURRENCY = 4
KILL_AFTER = 50  # completed requests before node 0 is killed
# Connection names (libs/bus connect) of the services; ingress and scheduler add an instance id.
CLIENTS = ("agent-sim-0", "agent-sim-1", "tokenizer", "indexer", "scheduler-", "ingress-")


@pytest.fixture
def cluster() -> Iterator[NatsCluster]:
    c = NatsCluster(3, max_payload=8 * 1024 * 1024).start()
    yield c
    c.stop()


def _rotated(c: NatsCluster, k: int) -> str:
    urls = [n.url for n in c.nodes]
    return ",".join(urls[k:] + urls[:k])


def _missing(names: list[str]) -> list[str]:
    return [want for want in CLIENTS if not any(n.startswith(want) for n in names)]


@dataclass
class Load:
    """What the client side saw."""

    ok: int = 0
    failed: list[str] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)  # (sent, done) of each
    pods: Counter[str] = field(default_factory=Counter)
    probes: list[tuple[list[int], None]] = field(default_factory=list)


async def _one(http: aiohttp.ClientSession, url: str, body: dict[str, Any], load: Load) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    t0 = time.monotonic()
    try:
        async with http.post(url + path, json=body) as r:
            data = await r.read()
            status, pod = r.status, r.headers.get("x-infermesh-endpoint", "")
    except aiohttp.ClientError as e:
        load.failed.append(f"{type(e).__name__}: {e}")
        return
    finally:
        load.spans.append((t0, time.monotonic()))
    text = data.decode(errors="replace")
    if status != 200:
        load.failed.append(f"{status}: {text[:200]}")
    elif body.get("stream") and (not text.rstrip().endswith("data: [DONE]")
                                 or '"error"' in text):
        load.failed.append(f"broken stream: {text[-300:]}")
    elif not body.get("stream") and '"completion_tokens":3' not in text.replace(" ", ""):
        load.failed.append(f"bad body: {text[:300]}")
    else:
        load.ok += 1
        load.pods[pod] += 1
        if "prompt" in body:
            load.probes.append((body["prompt"], None))


def _bodies(rng: random.Random) -> list[dict[str, Any]]:
    """Completions on token ids over 6 shared 4-block prefixes, every other one streamed; every
    5th a chat completion (streamed or not)."""
    prefixes = [random_prompt(rng, 4 * BS) for _ in range(6)]
    out: list[dict[str, Any]] = []
    for i in range(REQUESTS):
        stream = i % 2 == 1
        if i % 5 == 0:
            body: dict[str, Any] = {"messages": [{"role": "user", "content": f"hello {i}"}]}
        else:
            body = {"prompt": rng.choice(prefixes) + random_prompt(rng, rng.randrange(1, 40))}
        body.update(model=MODEL, max_tokens=3, stream=stream)
        out.append(body)
    return out


async def _decisions(http: aiohttp.ClientSession, port: int) -> float:
    m = await metrics(http, port)
    return sum(v for k, v in m.items() if k.startswith("infermesh_scheduler_decisions_total"))


async def test_killing_the_node_of_ingress_and_scheduler_under_load_loses_no_request(
    cluster: NatsCluster, procs: Any
) -> None:
    seed = cluster.nodes[0].url  # the node that will die
    _, info = procs.sim("--time-scale", "0.02", "--hash-seed", "0", engines=2)
    e0, e1 = info["engines"]
    procs.agent(seed, e0, "sim-0")
    procs.agent(_rotated(cluster, 1), e1, "sim-1")
    procs.service("tokenizer", "--nats-url", _rotated(cluster, 1), "--http-port", "-1")
    indexer_port, scheduler_port, ingress_port = free_port(), free_port(), free_port_range(1)
    procs.service("indexer", "--nats-url", _rotated(cluster, 2), "--http-port",
                  str(indexer_port))
    procs.service("scheduler", "--nats-url", seed, "--http-port", str(scheduler_port))
    # The services tokenize and decide (an ingress doing both itself needs no bus to route).
    ingress = procs.service("ingress", "--nats-url", seed, "--http-port", str(ingress_port),
                            "--no-schedule-here", "--no-tokenize-here")
    url = f"http://127.0.0.1:{ingress_port}"
    engines = {"sim-0": e0["http"], "sim-1": e1["http"]}

    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            assert ingress.alive(), ingress.tail()
            try:
                async with http.get(url + "/health") as r:
                    return r.status == 200 and (await r.json()).get("pods") == 2
            except aiohttp.ClientError:
                return False

        await wait_until(ready, timeout=60, what="ingress sees both engines")
        await services_ready(cluster.urls)
        await wait_until(lambda: not _missing(sum((cluster.client_names(i) for i in range(3)),
                                                   [])), what="every client connected")
        on_victim = cluster.client_names(0)
        for name in ("ingress-", "scheduler-", "agent-sim-0"):
            assert any(n.startswith(name) for n in on_victim), on_victim

        load = Load()
        bodies = iter(_bodies(random.Random(6)))
        killed_at: list[float] = []

        async def worker() -> None:
            for body in bodies:
                await _one(http, url, body, load)
                if len(load.spans) >= KILL_AFTER and not killed_at:
                    killed_at.append(time.monotonic())
                    cluster.kill(0)  # SIGKILL, as a crash

        async def recovery() -> tuple[float, float]:
            """(kill → every client on a surviving node, kill → first scheduler decision)."""
            await wait_until(lambda: bool(killed_at), timeout=120, what="the kill",
                             interval=0.005)
            t_kill = killed_at[0]
            base = await _decisions(http, scheduler_port)
            reconnected = decided = 0.0
            names: list[str] = []
            while not (reconnected and decided):
                if not reconnected:
                    names = sum([await asyncio.to_thread(cluster.client_names, i)
                                 for i in (1, 2)], [])
                    if not _missing(names):
                        reconnected = time.monotonic() - t_kill
                if not decided and await _decisions(http, scheduler_port) > base:
                    decided = time.monotonic() - t_kill
                assert time.monotonic() - t_kill < 30, f"no recovery: {_missing(names)}"
                await asyncio.sleep(0.01)
            return reconnected, decided

        watch = asyncio.create_task(recovery())
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        t_reconnect, t_decide = await watch

        t_kill = killed_at[0]
        across = sum(1 for a, b in load.spans if a < t_kill < b)
        during = sum(1 for a, _ in load.spans if t_kill <= a < t_kill + t_reconnect)
        after = sum(1 for a, _ in load.spans if a >= t_kill)
        m = await metrics(http, ingress_port)
        fallbacks = {k.split('"')[1]: int(v) for k, v in m.items()
                     if k.startswith("infermesh_ingress_fallbacks_total")}
        print(f"\nnats cluster, node 0 (ingress + scheduler + agent sim-0) killed after "
              f"{KILL_AFTER} of {REQUESTS} requests: sent {len(load.spans)}, ok {load.ok}, "
              f"failed {len(load.failed)}; in flight at the kill {across}, sent before every "
              f"client was back {during} (recovered: all of them succeeded), sent after the "
              f"kill {after}; kill -> every client reconnected {t_reconnect * 1000:.0f} ms, "
              f"kill -> first scheduler decision {t_decide * 1000:.0f} ms; ingress fallbacks "
              f"{fallbacks or 'none'}; pods {dict(load.pods)}")
        assert len(load.spans) == REQUESTS
        assert load.failed == [], load.failed[:5]
        assert load.ok == REQUESTS
        assert after >= REQUESTS - KILL_AFTER - CONCURRENCY  # the cut happened under load

        # The index converges on the engines' real caches (KV batches lost in the cut are
        # repaired by seq gaps, heartbeats' kv_seq and snapshots).
        nc = await connect(cluster.nodes[1].url, "test-cluster")
        try:
            caches = await read_caches(http, engines)
            probes: list[Any] = load.probes
            await wait_until(lambda: converged(nc, caches, probes), timeout=30,
                             what="indexer converged", interval=0.2)
            idx = await metrics(http, indexer_port)
            gaps = {k.split('"')[1]: int(v) for k, v in idx.items()
                    if k.startswith("infermesh_indexer_gaps_total") and v}
            print(f"indexer converged: gaps {gaps or 'none'}, snapshots applied "
                  f"{int(idx.get('infermesh_indexer_snapshots_applied_total', 0))}")

            # Prefix routing still works: a new prefix, once indexed, draws its follow-ups.
            prefix = random_prompt(random.Random(7), 10 * BS)
            keys = kvblock.prompt_keys(MODEL, prefix, BS)

            async def post(ids: list[int]) -> str:
                async with http.post(url + "/v1/completions",
                                     json={"model": MODEL, "prompt": ids, "max_tokens": 1}) as r:
                    assert r.status == 200, await r.text()
                    return r.headers["x-infermesh-endpoint"]

            first = await post(prefix)

            async def indexed() -> bool:
                r = await request(nc, "im.index.lookup",
                                  LookupRequest(model=MODEL, block_keys=keys), LookupReply)
                return any(m.pod == first and m.blocks >= len(keys) for m in r.matches)

            await wait_until(indexed, what="new prefix indexed")
            rng = random.Random(8)
            hits = Counter([await post(prefix + random_prompt(rng, 5)) for _ in range(6)])
            assert hits == {first: 6}, hits
        finally:
            await nc.close()

    # Node 0 comes back on its ports, re-joins, and serves clients again.
    t0 = time.monotonic()
    cluster.start_node(0)
    print(f"node 0 restarted and re-routed in {(time.monotonic() - t0) * 1000:.0f} ms")
    for i in range(3):
        assert cluster.route_peers(i) == {f"infermesh-{j}" for j in range(3) if j != i}
    nc = await connect(cluster.nodes[0].url, "test-node-0", first_connect_timeout=5)
    try:
        r = await request(nc, "im.index.lookup", LookupRequest(model=MODEL, block_keys=keys),
                          LookupReply, timeout=5)
        assert any(m.pod == first for m in r.matches)  # the indexer answers across the routes
    finally:
        await nc.close()


async def test_a_tokenize_request_lost_in_the_cut_is_asked_again(nats_server: Any) -> None:
    """The tokenizer drops the first ask (as a dying node would); the second one is answered and
    the request is routed with the prompt's block keys, not by load alone."""
    world = World(nats_server.url)
    asks: list[int] = []
    try:
        # A timeout long enough that the second ask is answered even on a loaded machine
        # (the stub, the ingress and this test share one event loop).
        await world.start({"a": "ok", "b": "ok"}, tokenizer=False, tokenize_timeout_s=2.0)

        async def tokenizer(msg: Any) -> None:
            asks.append(1)
            if len(asks) % 2 == 1:
                return  # lost with its node
            await msg.respond(codec.encode(TokenizeReply(num_tokens=3, block_keys=[7, 8, 9])))

        await world.nc.subscribe("im.tokenize", cb=tokenizer)
        await settle(world.nc)
        async with aiohttp.ClientSession() as http:
            async with http.post(world.url + "/v1/completions",
                                 json={"model": "m", "prompt": "x"}) as r:
                assert r.status == 200, await r.text()
            async with http.get(world.url + "/metrics") as r:
                text = await r.text()
        assert len(asks) == 2, (len(asks), text)
        assert world.schedule_calls[-1].block_keys == [7, 8, 9]
        assert 'reason="tokenizer_unavailable"' not in text
    finally:
        await world.stop()


async def test_every_node_includes_the_extra_config(tmp_path: Path) -> None:
    """``include`` reaches every node (here: a user and password), and messages cross routes."""
    auth = tmp_path / "auth.conf"
    auth.write_text('authorization {\n  user: "svc"\n  password: "s3cret"\n}\n')
    with NatsCluster(2, include=str(auth)) as c:
        for node in c.nodes:
            with pytest.raises(nats.errors.Error):
                await nats.connect(node.url, allow_reconnect=False, connect_timeout=2)
        a = await connect(c.nodes[0].url, "a", user="svc", password="s3cret")
        b = await connect(c.nodes[1].url, "b", user="svc", password="s3cret")
        try:
            sub = await b.subscribe("hello")
            await settle(b)

            # Interest reaches node 0 over the route a moment after the subscribe.
            async def crossed() -> bool:
                await a.publish("hello", b"x")
                try:
                    return (await sub.next_msg(timeout=0.1)).data == b"x"
                except nats.errors.TimeoutError:
                    return False

            await wait_until(crossed, what="a message across the route")
        finally:
            await a.close()
            await b.close()


def test_make_up_passes_nats_cluster() -> None:
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(["make", "-n", "up", "NATS_CLUSTER=3"], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    assert "--nats-cluster 3" in out
    plain = subprocess.run(["make", "-n", "up"], cwd=root, capture_output=True, text=True,
                           check=True).stdout
    assert "infermesh up" in plain and "--nats-cluster" not in plain


def _pid_listening(port: int) -> int:
    """The nats-server process started with ``-p port`` (one of ours: found by its command)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"nats-server") and b"-p" in argv[:-1]:
            if argv[argv.index(b"-p") + 1] == str(port).encode():
                return int(entry.name)
    raise AssertionError(f"no nats-server on port {port}")


def test_up_runs_a_cluster_and_restarts_a_dead_node(tmp_path: Path, model_dir: Path) -> None:
    with infermesh_up(tmp_path, model_dir, ["--engines", "1", "--nats-cluster", "3"]) as (
            proc, log, run):
        text = log.read_text()
        ports = [int(u.rsplit(":", 1)[1]) for u in run.nats_url.split(",")]
        assert len(ports) == 3
        for i in range(3):
            assert f"nats-{i}" in text and f"nats://127.0.0.1:{ports[i]}" in text
        nats = ports[0]
        victim = _pid_listening(ports[1])
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:  # the launcher restarts it on the same port (a new process)
            try:
                if _pid_listening(ports[1]) != victim:
                    break
            except AssertionError:
                pass
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        while "process_restarted" not in log.read_text():  # logged just after the start
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        assert '"nats-1"' in log.read_text()
        # The whole system still answers through the ingress.
        body = b'{"model": "%s", "prompt": "Hi", "max_tokens": 2}' % MODEL.encode()
        req = urllib.request.Request(f"{run.ingress_url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        with pytest.raises(AssertionError):
            _pid_listening(nats)  # nodes stopped with the launcher
