"""The autoscaler as a real process on a real nats-server, fed heartbeats of pods that do not
exist (their load set by the test), request events and an ingress's demand: it scales a
saturated pool up to the computed count, back down when the load goes, from zero when requests
are held, to zero after idling, counts garbage and keeps deciding, exports its gauges, and
serves KEDA's external scaler."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from infermesh.libs.bus import NatsServer, connect
from infermesh.libs.process.ports import free_port
from infermesh.proto import codec
from infermesh.proto.messages import PodState, RequestEvent, ScaleDecision, ScaleDemand

from ..conftest import ProcessManager
from .helpers import wait_until

MODEL = "infermesh/tiny-llama"


class Pods:
    """Heartbeats of fake pods every 100 ms; ``set`` changes a pod's load, ``drop`` stops it
    (with a last ``ready=False``, as its agent says when its engine goes)."""

    def __init__(self, nc: Any, pool: str = "default") -> None:
        self.nc, self.pool = nc, pool
        self.states: dict[str, PodState] = {}
        self._task: asyncio.Task[None] | None = None

    def set(self, name: str, **kw: Any) -> None:
        st = self.states.get(name) or PodState(
            pod=name, pool=self.pool, model=MODEL, url=f"http://{name}.test:8000", ts=0.0,
            epoch="e1", kv_seq=0)
        self.states[name] = msgspec.structs.replace(st, **kw)

    async def drop(self, name: str) -> None:
        st = self.states.pop(name)
        await self.nc.publish(f"im.pod.{self.pool}.{name}",
                              codec.encode(msgspec.structs.replace(st, ready=False)))

    async def _loop(self) -> None:
        while True:
            for name, st in list(self.states.items()):
                await self.nc.publish(f"im.pod.{self.pool}.{name}", codec.encode(st))
            await asyncio.sleep(0.1)

    def start(self) -> Pods:
        self._task = asyncio.create_task(self._loop())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Decisions:
    """The latest ScaleDecision per pool, as published on im.scale.*."""

    def __init__(self) -> None:
        self.latest: dict[str, ScaleDecision] = {}
        self.all: list[ScaleDecision] = []

    async def cb(self, msg: Any) -> None:
        if b"decision" not in msg.data:
            return
        d = codec.decode(msg.data, ScaleDecision)
        self.latest[d.pool] = d
        self.all.append(d)

    def target(self, pool: str = "default") -> int | None:
        d = self.latest.get(pool)
        return None if d is None else d.target_replicas


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Any]:
    nc = await connect(nats_server.url, "test")
    yield nc
    await nc.close()


def start_autoscaler(procs: ProcessManager, nats_url: str, port: int, *extra: str) -> None:
    procs.service(
        "autoscaler", "--nats-url", nats_url, "--http-port", str(port), "--interval-s", "0.2",
        "--warmup-s", "0.5", "--scale-up-cooldown-s", "1", "--scale-down-cooldown-s", "1",
        "--scale-down-stabilization-s", "1.5", "--max-replicas", "6", *extra)


async def test_saturation_up_down_and_garbage(procs: ProcessManager, nats_server: NatsServer,
                                              bus: Any, tmp_path: Path) -> None:
    port = free_port()
    seen = Decisions()
    await bus.subscribe("im.scale.*", cb=seen.cb)
    pods = Pods(bus)
    for name in ("p0", "p1"):
        pods.set(name, kv_usage=0.5)  # KV 1.0 in all: 2 replicas needed
    pods.start()
    start_autoscaler(procs, nats_server.url, port)
    try:
        await wait_until(lambda: seen.target() == 2, 20, "a steady first decision")
        d = seen.latest["default"]
        assert d.model == MODEL and d.ready_replicas == 2 and d.mode == "saturation"
        assert d.inputs["spare_kv"] == pytest.approx(0.3) and d.inputs["needed"] == 2
        # Garbage on every subject it reads: counted, dropped, the decisions go on.
        for subject in ("im.pod.default.p9", "im.req.default", "im.scale.default"):
            await bus.publish(subject, b"\xc1not msgpack")
        bad = msgspec.structs.replace(pods.states["p0"], pool="bad pool", pod="p7")
        await bus.publish("im.pod.x.p7", codec.encode(bad))  # valid msgpack, invalid pool
        # Saturated: KV 0.85 and 0.78 (spare 0.02), 9 waiting: KV needs ceil(1.63/0.7) = 3,
        # the queue ceil(9/2) = 5.
        pods.set("p0", kv_usage=0.85, waiting=4)
        pods.set("p1", kv_usage=0.78, waiting=5)
        await wait_until(lambda: seen.target() == 5, 20, "scale-up to the computed count")
        up = seen.latest["default"]
        assert up.reason.startswith("saturated") and up.inputs["needed"] == 5
        # The new replicas arrive and the load spreads: steady at 5.
        for i in range(5):
            pods.set(f"p{i}", kv_usage=0.3, waiting=1)
        await wait_until(lambda: seen.latest["default"].ready_replicas == 5, 20, "5 ready")
        assert seen.target() == 5
        # The load goes: down to min_replicas (1) after stabilization and cooldown.
        for i in range(5):
            pods.set(f"p{i}", kv_usage=0.02, waiting=0)
        await wait_until(lambda: seen.target() == 1, 20, "scale-down")
        assert "load fits 1" in seen.latest["default"].reason
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
            async with http.get(f"http://127.0.0.1:{port}/health") as r:
                health = await r.json()
        assert 'infermesh_autoscaler_desired_replicas{pool="default"} 1.0' in text
        assert 'infermesh_autoscaler_ready_replicas{pool="default"} 5.0' in text
        assert 'infermesh_autoscaler_changes_total{direction="up",pool="default"} 1.0' in text
        for kind in ("pod_state", "request_event", "scale_demand"):
            assert (f'infermesh_autoscaler_bus_messages_total{{kind="{kind}",outcome="bad"}}'
                    in text), kind
        assert health["pools"]["default"]["desired"] == 1
        # One step up, then only down (the load left between two ticks may take two steps):
        # no flapping on the way.
        targets = [d.target_replicas for d in seen.all]
        changes = [b for a, b in zip(targets, targets[1:], strict=False) if a != b]
        assert changes[0] == 5 and changes[-1] == 1, targets
        assert changes[1:] == sorted(changes[1:], reverse=True), targets
    finally:
        await pods.stop()


async def test_from_zero_on_demand_and_to_zero_when_idle(procs: ProcessManager,
                                                         nats_server: NatsServer,
                                                         bus: Any) -> None:
    seen = Decisions()
    await bus.subscribe("im.scale.*", cb=seen.cb)
    pods = Pods(bus).start()
    start_autoscaler(procs, nats_server.url, free_port(), "--min-replicas", "0",
                     "--pools", "default", "--scale-to-zero-after-s", "2")
    try:
        # A pool at zero, known from the config alone: it stays at zero.
        await wait_until(lambda: seen.target() == 0, 20, "a pool at zero")
        # An ingress holds requests for it: one replica at once.
        demand = ScaleDemand(pool="default", model=MODEL, ts=0.0, queued=3, replica="ing-0")
        await bus.publish("im.scale.default", codec.encode(demand))
        await wait_until(lambda: seen.target() == 1, 10, "scale from zero")
        assert seen.latest["default"].reason.startswith("scale from zero: 3 held")
        # The pod comes; requests flow, then stop: after 2 s idle the pool goes back to zero.
        pods.set("p0", kv_usage=0.1)
        await bus.publish("im.scale.default", codec.encode(
            msgspec.structs.replace(demand, queued=0)))
        for kind in ("routed", "first_token", "finished"):
            await bus.publish("im.req.default", codec.encode(RequestEvent(
                kind=kind, request_id="r1", pod="p0", pool="default", model=MODEL, ts=1.0,
                ttft_s=0.05, output_tokens=3)))
        await wait_until(lambda: seen.latest["default"].ready_replicas == 1, 10, "p0 ready")
        assert seen.target() == 1
        await wait_until(lambda: seen.target() == 0, 20, "scale to zero")
        last = seen.latest["default"]
        assert "idle" in last.reason and last.inputs["idle_s"] >= 2
        await pods.drop("p0")
    finally:
        await pods.stop()


async def test_keda_external_scaler_follows_the_decisions(procs: ProcessManager,
                                                          nats_server: NatsServer,
                                                          bus: Any) -> None:
    """A grpc client speaking KEDA's externalscaler.proto: the metric spec, the desired
    replicas as the metric (following the load), IsActive 0 ↔ 1 and its stream, and clear
    errors for a trigger without a pool or a pool not decided."""
    import grpc

    from infermesh.services.autoscaler.keda import externalscaler_pb2 as pb
    from infermesh.services.autoscaler.keda import externalscaler_pb2_grpc as pb_grpc

    keda = free_port()
    seen = Decisions()
    await bus.subscribe("im.scale.*", cb=seen.cb)
    pods = Pods(bus).start()
    start_autoscaler(procs, nats_server.url, free_port(), "--min-replicas", "0",
                     "--pools", "default", "--scale-to-zero-after-s", "1.5",
                     "--keda-port", str(keda))
    ref = pb.ScaledObjectRef(name="vllm", namespace="ml", scalerMetadata={"pool": "default"})
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{keda}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)

            async def metric() -> float:
                r = await stub.GetMetrics(pb.GetMetricsRequest(
                    scaledObjectRef=ref, metricName="infermesh-default-desired-replicas"))
                (v,) = r.metricValues
                assert v.metricName == "infermesh-default-desired-replicas"
                assert v.metricValue == int(v.metricValueFloat)
                return v.metricValueFloat

            async def decided() -> bool:
                try:
                    await stub.IsActive(ref)
                    return True
                except grpc.aio.AioRpcError as e:
                    assert e.code() in (grpc.StatusCode.NOT_FOUND,
                                        grpc.StatusCode.UNAVAILABLE), e
                    return False

            await wait_until(decided, 20, "the scaler answering")
            spec = (await stub.GetMetricSpec(ref)).metricSpecs
            assert [(s.metricName, s.targetSizeFloat, s.targetSize) for s in spec] == [
                ("infermesh-default-desired-replicas", 1.0, 1)]
            # At zero: inactive, metric 0.
            assert not (await stub.IsActive(ref)).result and await metric() == 0.0
            stream = stub.StreamIsActive(ref)
            assert (await stream.read()).result is False  # the current answer, at once
            # Demand: active (streamed), metric 1.
            await bus.publish("im.scale.default", codec.encode(ScaleDemand(
                pool="default", model=MODEL, ts=0.0, queued=2, replica="ing")))
            assert (await asyncio.wait_for(stream.read(), 10)).result is True
            assert (await stub.IsActive(ref)).result and await metric() == 1.0
            # The pod serves, and saturates: the metric follows the decision.
            pods.set("p0", kv_usage=0.95, waiting=8)
            await bus.publish("im.scale.default", codec.encode(ScaleDemand(
                pool="default", model=MODEL, ts=0.0, queued=0, replica="ing")))
            await wait_until(lambda: (seen.target() or 0) > 1, 20, "scale-up")
            want = float(seen.target() or 0)
            await wait_until(lambda: _eq(metric(), want), 10, "the metric following")
            # Idle: back to zero, the stream says inactive.
            pods.set("p0", kv_usage=0.0, waiting=0)
            assert (await asyncio.wait_for(stream.read(), 30)).result is False
            assert await metric() == 0.0
            stream.cancel()
            # Errors: no pool in the metadata; a pool not decided.
            for meta, code in (({}, grpc.StatusCode.INVALID_ARGUMENT),
                               ({"pool": "nope"}, grpc.StatusCode.NOT_FOUND)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.GetMetricSpec(pb.ScaledObjectRef(name="x", scalerMetadata=meta))
                assert err.value.code() == code and err.value.details()
    finally:
        await pods.stop()


async def _eq(value: Any, want: float) -> bool:
    return await value == want


async def test_two_replicas_one_leader_and_takeover_mid_ramp(procs: ProcessManager,
                                                             nats_server: NatsServer,
                                                             bus: Any) -> None:
    """Two autoscaler replicas on one bus: only the lease holder publishes decisions; the
    leader is SIGKILLed while the pool is scaling up, and the other takes the lease over and
    goes on with the ramp from where the leader was (not from scratch); a leader stopped
    cleanly hands the lease over at once."""
    seen = Decisions()
    await bus.subscribe("im.scale.*", cb=seen.cb)
    pods = Pods(bus)
    pods.set("p0", kv_usage=0.85, waiting=6)  # saturated: a replica more at every cooldown
    pods.start()
    ttl = 1.5
    common = ("--lease-ttl-s", str(ttl), "--max-replicas", "8", "--scale-up-cooldown-s", "1")
    by_replica: dict[str, Any] = {}
    for i in range(2):
        p = procs.service("autoscaler", "--nats-url", nats_server.url, "--http-port", "-1",
                          "--interval-s", "0.2", "--warmup-s", "0.5", *common,
                          name=f"autoscaler-{i}")
        by_replica[p.pid] = p
    try:
        # The ramp: each new target arrives as saturated replicas, so it keeps climbing.
        def follow_ramp() -> None:
            t = seen.target() or 0
            for i in range(t):
                pods.set(f"p{i}", kv_usage=0.85, waiting=6)

        async def ramp_to(n: int, timeout: float, what: str) -> None:
            async def check() -> bool:
                follow_ramp()
                return (seen.target() or 0) >= n
            await wait_until(check, timeout, what)

        await ramp_to(3, 30, "the ramp under the first leader")
        leaders = {d.replica for d in seen.all}
        assert len(leaders) == 1, f"both replicas published: {leaders}"
        (leader,) = leaders
        pid = int(leader.rsplit("-", 1)[1])
        assert pid in by_replica, f"{leader} is not one of the replicas started"
        before = seen.target() or 0
        n_before = len(seen.all)
        killed_at = time.time()
        by_replica[pid].kill()  # mid-ramp, as a crash would
        await wait_until(lambda: any(d.replica != leader for d in seen.all[n_before:]), 15,
                         "the other replica takes over")
        first = next(d for d in seen.all[n_before:] if d.replica != leader)
        print(f"takeover: first decision of the new leader {first.ts - killed_at:.2f} s after "
              f"the kill (lease TTL {ttl} s), target {first.target_replicas} (was {before})")
        # It goes on from the leader's target (it followed the decisions), not from scratch.
        assert first.target_replicas >= before, (first.target_replicas, before)
        await ramp_to(min(8, before + 2), 30, "the ramp under the new leader")
        successor = first.replica
        after = seen.all[seen.all.index(first):]
        assert {d.replica for d in after} == {successor}
        # A clean stop releases the lease: a third replica, started now, follows until the
        # successor stops and then takes over without waiting out the TTL.
        port = free_port()
        third = procs.service("autoscaler", "--nats-url", nats_server.url, "--http-port",
                              str(port), "--interval-s", "0.2", "--warmup-s", "0.5", *common,
                              name="autoscaler-2")
        health: dict[str, Any] = {}
        async with aiohttp.ClientSession() as http:
            async def following() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/health") as r:
                        health.update(await r.json())
                return health.get("pools", {}).get("default", {}).get("desired") == \
                    seen.target()
            # A follower: it names the leader, and what it shows (and would tell KEDA) is the
            # leader's decision.
            await wait_until(following, 15, "the third replica following the leader")
            assert health["role"] == "follower" and health["lease_holder"] == successor
            assert {d.replica for d in seen.all[seen.all.index(first):]} == {successor}
            n_stop = len(seen.all)
            next(p for pid_, p in by_replica.items() if pid_ != pid).stop()
            await wait_until(lambda: any(d.replica.endswith(f"-{third.pid}")
                                         for d in seen.all[n_stop:]), 10,
                             "handover on a clean stop")
            async with http.get(f"http://127.0.0.1:{port}/health") as r:
                assert (await r.json())["role"] == "leader"
    finally:
        await pods.stop()


async def test_on_a_nats_without_jetstream_only_no_lease_acts(procs: ProcessManager,
                                                              tmp_path: Path) -> None:
    """With the lease on and no JetStream, the replica publishes nothing and /health names the
    lease error; with --no-lease it publishes (a single replica's setup)."""
    srv = NatsServer(work_dir=tmp_path / "nats", jetstream=False).start()
    procs.cleanups.append(srv.stop)
    nc = await connect(srv.url, "test")
    seen = Decisions()
    await nc.subscribe("im.scale.*", cb=seen.cb)
    try:
        port = free_port()
        start_autoscaler(procs, srv.url, port, "--pools", "default")
        health: dict[str, Any] = {}
        async with aiohttp.ClientSession() as http:
            async def answered() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/health") as r:
                        health.update(await r.json())
                return bool(health.get("lease_error"))
            await wait_until(answered, 20, "the lease error in /health")
        assert health["role"] == "follower" and not seen.all
        start_autoscaler(procs, srv.url, free_port(), "--pools", "default", "--no-lease")
        await wait_until(lambda: seen.target() is not None, 20, "decisions without the lease")
        assert {d.replica for d in seen.all} == {seen.all[0].replica}
    finally:
        await nc.close()
