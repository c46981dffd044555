"""The time scale applies whatever the target: with ``--url`` the preset's scale (or
``--time-scale``) still places the arrivals and converts latencies to modelled seconds; and
``--repeat`` keeps every repeat in results.json. Against a fake OpenAI endpoint in this process
that answers after a fixed wall-clock delay."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infermesh.services.bench import runner
from infermesh.services.bench import workload as W
from infermesh.services.system.spec import SystemSpec

DELAY_S = 0.2  # wall seconds before the first token


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(DELAY_S)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        chunks = [{"choices": [{"index": 0, "text": " tok"}]} for _ in range(body["max_tokens"])]
        chunks.append({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens":
                                                body["max_tokens"],
                                                "prompt_tokens_details": {"cached_tokens": 4}}})
        for c in chunks:
            self.wfile.write(b"data: " + json.dumps(c).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_url() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def _preset(time_scale: float) -> runner.Preset:
    return runner.Preset(
        name="tiny-url", description="test",
        workload=lambda tok, seed: W.shared_prefix(
            tok, num_groups=1, prompts_per_group=4, system_prompt_len=20, question_len=5,
            output_len=2, seed=seed),
        stages=[W.Stage(8, 1.0)],  # modelled: 8 QPS for 1 s
        system=SystemSpec(engines=1, time_scale=time_scale),
        profiles=["default"],
    )


def _arrivals(stages: list[W.Stage], scale: float, seed: int) -> list[float]:
    return W.poisson_arrivals(W.scale_time(stages, scale), seed)


@pytest.mark.parametrize(("preset_scale", "override", "scale"),
                         [(0.5, None, 0.5), (0.5, 2.0, 2.0)],
                         ids=["preset-scale", "time-scale-flag"])
def test_url_runs_at_the_preset_time_scale(fake_url: str, tmp_path: Path,
                                           preset_scale: float, override: float | None,
                                           scale: float) -> None:
    preset = _preset(preset_scale)
    doc = runner.run(preset, tmp_path, url=fake_url, seed=3, time_scale=override)
    assert doc["time_scale"] == scale  # before: forced to 1.0 with a url
    s = doc["profiles"]["default"]
    assert s["errors"] == 0 and s["requests"] == len(_arrivals(preset.stages, scale, 3)) > 0
    # Latencies in modelled seconds: the wall delay divided by the scale.
    assert s["ttft_p50_s"] >= DELAY_S / scale
    assert s["ttft_p50_s"] < (DELAY_S + 0.4) / scale
    # Arrivals at the scaled moments (wall), whatever the target.
    raw = json.loads((tmp_path / "requests.json").read_text())["default"]
    sent = sorted(r["start_s"] for r in raw)
    for got, want in zip(sent, _arrivals(preset.stages, scale, 3), strict=True):
        assert got == pytest.approx(want, abs=0.15)
    # Nothing local was measured: no CPU of a control plane or engines.
    assert s["control_plane_cpu_s_per_1k"] is None and s["engines_cpu_s_per_1k"] is None
    assert s["client_cpu_s"] >= 0


def test_repeats_are_all_kept(fake_url: str, tmp_path: Path) -> None:
    doc = runner.run(_preset(0.25), tmp_path, url=fake_url, seed=1, repeat=3,
                     profiles=["default", "random"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["repeat"] == 3 and len(data["repeats"]) == 3
    assert data["rows"] == ["default", "random"]
    for row in data["rows"]:
        values = data["spread"][row]["ttft_p90_s"]["values"]
        assert len(values) == 3 and all(v > 0 for v in values)
        spread = data["spread"][row]["ttft_p90_s"]
        assert spread["min"] <= data["profiles"][row]["ttft_p90_s"] <= spread["max"]
        assert data["profiles"][row]["repeats"] == 3
    raw = json.loads((tmp_path / "requests.json").read_text())
    assert sorted({r["repeat"] for r in raw["default"]}) == [1, 2, 3]
    assert len(raw["default"]) == 3 * doc["requests"]
