"""The `tenants` preset: classes of requests with their own headers and arrival processes,
the rows' filters and settings, and the readings (per-class TTFTs, flow-control answers)."""

from __future__ import annotations

import pytest

from infermesh.services.bench import fleets as F
from infermesh.services.bench import runner
from infermesh.services.bench import tenants as T
from infermesh.services.bench import workload as W
from infermesh.services.bench.metrics import RequestResult


@pytest.fixture(scope="module")
def work() -> runner.Workload:
    return runner.build_workload(runner.PRESETS["tenants"], 0, 4.0, "m")


def test_each_class_arrives_at_its_own_rate_with_its_headers(work) -> None:
    reqs = work.requests
    assert [r.id for r in reqs] == list(range(len(reqs)))
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:], strict=False))
    wall = sum(s.duration_s for s in work.wall_stages)
    assert wall == pytest.approx(60.0)  # 15 modelled s at time scale 4
    for tag, rate in T.RATES.items():
        mine = [r for r in reqs if r.tag == tag]
        expected = rate * 15
        assert abs(len(mine) - expected) < 4 * expected ** 0.5, tag  # Poisson, 4 sigma
        assert all(dict(r.headers) == dict(T.HEADERS[tag]) for r in mine)
    # The heavy tenant offers 3x what the fleet computes (32 requests/s).
    heavy = sum(v for k, v in T.RATES.items() if k.startswith("heavy"))
    assert heavy == pytest.approx(3 * 32)
    # Prompts are unique within the run: no cache to route on.
    prompts = [r.prompt for r in reqs]
    assert len(set(prompts)) == len(prompts)
    assert {r.prompt_tokens for r in reqs} == {T.PROMPT_LEN + 1}  # with the BOS


def test_the_same_seed_gives_the_same_run() -> None:
    a = runner.build_workload(runner.PRESETS["tenants"], 3, 4.0, "m").requests
    b = runner.build_workload(runner.PRESETS["tenants"], 3, 4.0, "m").requests
    assert [(r.arrival_s, r.tag, r.prompt) for r in a] == [(r.arrival_s, r.tag, r.prompt)
                                                            for r in b]


def test_rows_filter_classes_drop_headers_and_set_the_ingress(work) -> None:
    preset = runner.PRESETS["tenants"]
    rows = {f.name: f for f in preset.fleets}
    alone = T.requests_for(work.requests, rows[T.ALONE].tags, rows[T.ALONE].drop_headers)
    assert alone and {r.tag for r in alone} == {"light"}
    fair = rows["flow fair"]
    stripped = T.requests_for(work.requests, fair.tags, fair.drop_headers)
    assert len(stripped) == len(work.requests)
    assert not any(k == T.PRIORITY for r in stripped for k, _ in r.headers)
    assert any(k == T.TENANT for r in stripped for k, _ in r.headers)
    every = T.requests_for(work.requests, (), ())
    assert every == work.requests
    spec = preset.system
    settings = {n: F.fleet_spec(spec, f, 4.0, 0.0).settings["ingress"] for n, f in rows.items()}
    assert settings["no flow control"]["flow_control"] is False
    assert settings["flow fcfs"]["flow_fairness"] == "off"
    # The preset's own ingress setting stays under each row's: one prompt in flight saturates
    # an engine, with room for the tokenizer's early estimate of a never-seen prompt's length
    # (a few percent either side) — at the prompt's own length, half the prompts did not.
    assert all(s["saturation_uncached_tokens"] == 500 for s in settings.values())
    assert 500 <= T.PROMPT_LEN // 2


def test_per_class_ttfts_flow_answers_and_the_comparison() -> None:
    def res(tag: str, ttft: float | None, status: int = 200) -> RequestResult:
        return RequestResult(id=0, ok=ttft is not None, status=status, ttft_s=ttft, tag=tag)

    results = [res("light", 0.4), res("light", 0.8), res("light", None, 503),
               res("heavy", 2.0), res("heavy", None, 429)]
    s = T.tag_stats(results, time_scale=4.0)
    assert s["light_ttft_p50_s"] == pytest.approx(0.15)
    assert s["light_ok"] == 2 and s["light_refused"] == 1 and s["heavy_refused"] == 1
    page = ('infermesh_ingress_flow_requests_total{band="0",outcome="admitted",tenant="a"} 3.0\n'
            'infermesh_ingress_flow_requests_total{band="1",outcome="admitted",tenant="b"} 2.0\n'
            'infermesh_ingress_flow_requests_total{band="-1",outcome="shed",tenant="b"} 4.0\n'
            'infermesh_ingress_flow_requests_total{band="0",outcome="full",tenant="a"} 1.0\n'
            "infermesh_ingress_flow_saturated 1.0\n")
    flow = T.parse_flow(page)
    assert flow == {"flow_admitted": 5.0, "flow_shed": 4.0, "flow_full": 1.0}
    waits = T.parse_flow('infermesh_ingress_flow_wait_seconds_sum{band="0",tenant="a"} 3.0\n'
                         'infermesh_ingress_flow_wait_seconds_count{band="0",tenant="a"} 2.0\n'
                         'infermesh_ingress_flow_wait_seconds_sum{band="1",tenant="a"} 1.0\n'
                         'infermesh_ingress_flow_wait_seconds_count{band="1",tenant="a"} 2.0\n')
    assert waits == {"flow_wait_a_s": 1.0}
    rows = {T.ALONE: {"light_ttft_p90_s": 0.2},
            "fair": {"light_ttft_p90_s": 0.3, **flow, "flow_displaced": 2.0},
            "none": {"light_ttft_p90_s": None}}
    T.compare(rows)
    assert rows["fair"]["light_p90_vs_alone"] == pytest.approx(1.5)
    assert rows["fair"]["flow_refused_full"] == 3.0
    assert rows["none"]["light_p90_vs_alone"] is None


def test_a_requests_own_headers_go_with_it() -> None:
    """The client sends a request's headers over the row's (profile) headers."""
    import asyncio

    from aiohttp import web

    from infermesh.services.bench.client import send

    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        return web.json_response({"error": {"message": "no"}}, status=429)

    async def main() -> RequestResult:
        import aiohttp

        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        r = web.AppRunner(app)
        await r.setup()
        site = web.TCPSite(r, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        req = W.BenchRequest(id=1, kind="completion", prompt="x", messages=None, max_tokens=1,
                             group=None, session=None, prompt_tokens=2,
                             headers=((T.TENANT, "t1"), (T.PRIORITY, "-1")), tag="heavy-shed")
        try:
            async with aiohttp.ClientSession() as http:
                return await send(http, f"http://127.0.0.1:{port}", req, model="m",
                                  profile="p", run_start=0.0, offered_rate=1.0,
                                  headers={"x-infermesh-profile": "p"})
        finally:
            await r.cleanup()

    out = asyncio.run(main())
    assert out.status == 429 and out.tag == "heavy-shed" and not out.ok
    assert seen[0]["x-infermesh-tenant"] == "t1" and seen[0]["x-infermesh-priority"] == "-1"
    assert seen[0]["x-infermesh-profile"] == "p"
