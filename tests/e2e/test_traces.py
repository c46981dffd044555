"""One OpenTelemetry trace per request across the processes: a small OTLP/HTTP receiver (the
protobuf ExportTraceServiceRequest a collector takes) gets the spans every process exports when
the standard OTEL_* variables point at it; one request — retried once on an engine that failed —
is one trace id through ingress → tokenizer → scheduler → indexer → engine, each span under the
one that called it."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from infermesh.libs.process.ports import free_port

from ..integration.helpers import wait_until

MODEL = "infermesh/tiny-llama"


class Receiver:
    """OTLP/HTTP traces endpoint: every span received, with its process's service.name."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    async def _traces(self, request: web.Request) -> web.Response:
        req = ExportTraceServiceRequest.FromString(await request.read())
        for rs in req.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes
                            if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    attrs = {a.key: (a.value.string_value or a.value.int_value)
                             for a in sp.attributes}
                    self.spans.append({"service": service, "name": sp.name,
                                       "trace": sp.trace_id.hex(), "id": sp.span_id.hex(),
                                       "parent": sp.parent_span_id.hex(), "attrs": attrs})
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def test_one_trace_per_request_across_every_hop_with_a_retry(
        stack_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    rx = Receiver()
    await rx.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{rx.port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms: export at once
    try:
        # Every hop on the bus (no tokenizing or scheduling inside the ingress; the scheduler
        # asks the indexer service), and engines that fail 40% of their requests with a 500.
        stack = stack_factory(engines=3, settings={
            "ingress": {"tokenize_here": False, "schedule_here": False,
                        "chained_routing": False, "max_attempts": 3},
            "scheduler": {"local_index_max_pods": 0},
            "sim": {"failure_rate": 0.4, "failure_codes": [500]},
        })
        statuses = []
        async with aiohttp.ClientSession() as http:
            for i in range(16):
                body = {"model": MODEL, "prompt": f"trace me {i} " * 20, "max_tokens": 2}
                async with http.post(stack.ingress_url + "/v1/completions", json=body,
                                     headers={"X-Request-Id": f"t{i}"}) as r:
                    await r.read()
                    statuses.append(r.status)
        assert 200 in statuses

        def by_trace() -> dict[str, list[dict[str, Any]]]:
            out: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for s in rx.spans:
                out[s["trace"]].append(s)
            return out

        def retried_and_whole() -> list[dict[str, Any]] | None:
            for spans in by_trace().values():
                names = [s["name"] for s in spans]
                services = {s["service"] for s in spans}
                codes = {s["attrs"].get("http.response.status_code") for s in spans
                         if s["name"].startswith("engine ")}
                if ({200, 500} <= codes and names.count("llm_request") >= 2
                        and {"infermesh-ingress", "infermesh-tokenizer", "infermesh-scheduler",
                             "infermesh-indexer", "infermesh-sim"} <= services):
                    return spans
            return None

        try:
            await wait_until(lambda: retried_and_whole() is not None, 30,
                             "a retried request's whole trace")
        except AssertionError:
            for t, sp in by_trace().items():
                print(t, sorted((x["service"], x["name"], x["attrs"].get(
                    "http.response.status_code")) for x in sp))
            print(statuses)
            raise
        spans = retried_and_whole()
        assert spans is not None
        ids = {s["id"]: s for s in spans}
        (root,) = [s for s in spans if s["parent"] == "" or s["parent"] not in ids]
        assert root["service"] == "infermesh-ingress" and root["name"] == "POST /v1/completions"
        assert root["attrs"]["http.response.status_code"] == 200
        assert root["attrs"]["infermesh.attempts"] >= 2
        # Each engine span is a child of an attempt's client span, which is the root's child.
        attempts = [s for s in spans if s["name"].startswith("engine ")]
        assert all(a["parent"] == root["id"] for a in attempts)
        codes = sorted(a["attrs"]["http.response.status_code"] for a in attempts)
        assert codes[0] == 200 and codes[-1] == 500
        for s in spans:
            if s["name"] == "llm_request":
                assert ids[s["parent"]]["name"].startswith("engine ")
        sched = next(s for s in spans if s["service"] == "infermesh-scheduler")
        assert sched["attrs"]["infermesh.pod"] in {a["attrs"]["infermesh.pod"] for a in attempts}
        lookup = next(s for s in spans if s["service"] == "infermesh-indexer")
        assert ids[lookup["parent"]]["service"] == "infermesh-scheduler"
        print(json.dumps(sorted((s["service"], s["name"]) for s in spans)))
    finally:
        await rx.stop()
        await asyncio.sleep(0)
