"""KEDA's external scaler over the autoscaler's decisions.

A ScaledObject points its trigger (``type: external``, or ``external-push`` for
``StreamIsActive``) at ``--keda-port`` with ``metadata: {pool: <pool>}``. Then:

* ``IsActive`` / ``StreamIsActive``: whether the pool's desired replicas are above zero — KEDA's
  own 0 ↔ 1 step (the stream sends the current answer at once, then every change);
* ``GetMetricSpec``: one metric, ``infermesh-<pool>-desired-replicas``, target 1 per replica;
* ``GetMetrics``: the desired replicas, so the HPA KEDA drives asks for exactly that many.

A trigger without ``pool`` is ``INVALID_ARGUMENT``; a pool the autoscaler has not decided yet is
``NOT_FOUND`` (KEDA retries).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from infermesh.proto.messages import ScaleDecision

from . import externalscaler_pb2 as pb
from . import externalscaler_pb2_grpc as pb_grpc

Decisions = Callable[[], dict[str, ScaleDecision]]


def metric_name(pool: str) -> str:
    return f"infermesh-{pool}-desired-replicas"


class ExternalScaler(pb_grpc.ExternalScalerServicer):  # type: ignore[misc]
    """Answers from ``decisions()`` (pool → the latest ScaleDecision)."""

    def __init__(self, decisions: Decisions, poll_s: float = 0.5) -> None:
        self._decisions = decisions
        self.poll_s = poll_s

    async def _decision(self, ref: pb.ScaledObjectRef,
                        context: grpc.aio.ServicerContext) -> ScaleDecision:
        pool = ref.scalerMetadata.get("pool", "")
        if not pool:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the trigger's metadata needs `pool` (the infermesh pool)")
        d = self._decisions().get(pool)
        if d is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no decision for pool {pool!r} yet (known: "
                                f"{', '.join(sorted(self._decisions())) or 'none'})")
        assert d is not None
        return d

    async def IsActive(self, request: pb.ScaledObjectRef,  # noqa: N802 - the proto's name
                       context: grpc.aio.ServicerContext) -> pb.IsActiveResponse:
        d = await self._decision(request, context)
        return pb.IsActiveResponse(result=d.target_replicas > 0)

    async def StreamIsActive(self, request: pb.ScaledObjectRef,  # noqa: N802
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.IsActiveResponse]:
        last: bool | None = None
        while True:
            d = await self._decision(request, context)
            active = d.target_replicas > 0
            if active != last:
                last = active
                yield pb.IsActiveResponse(result=active)
            await asyncio.sleep(self.poll_s)

    async def GetMetricSpec(self, request: pb.ScaledObjectRef,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> pb.GetMetricSpecResponse:
        d = await self._decision(request, context)
        return pb.GetMetricSpecResponse(metricSpecs=[
            pb.MetricSpec(metricName=metric_name(d.pool), targetSize=1, targetSizeFloat=1.0)])

    async def GetMetrics(self, request: pb.GetMetricsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.GetMetricsResponse:
        d = await self._decision(request.scaledObjectRef, context)
        name = request.metricName or metric_name(d.pool)
        return pb.GetMetricsResponse(metricValues=[
            pb.MetricValue(metricName=name, metricValue=d.target_replicas,
                           metricValueFloat=float(d.target_replicas))])


async def serve(decisions: Decisions, host: str, port: int,
                poll_s: float = 0.5) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server; return it and the port it listens on."""
    server = grpc.aio.server()
    pb_grpc.add_ExternalScalerServicer_to_server(ExternalScaler(decisions, poll_s), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot listen on {host}:{port} for the KEDA external scaler")
    await server.start()
    return server, bound
