"""`infermesh bench --peers` end to end: a peer router policy in front of a fresh fleet of
simulated engines, next to one of our profiles on a fresh system, the same requests for both,
CPU accounted for both, and nothing left running afterwards (also when the run fails).

Needs the peer routers (`pip install 'infermesh[peers]'`, which the `test` extra pulls in);
skipped with the reason when they are not installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from infermesh.services.bench import cpu, peers, runner
from infermesh.services.bench import workload as W
from infermesh.services.system.spec import SystemSpec

needs_sglang = pytest.mark.skipif(
    peers.find_executable("sglang-router") is None,
    reason=f"sglang-router is not installed ({peers.INSTALL_HINT})")


def _tiny() -> runner.Preset:
    return runner.Preset(
        name="tiny-peers",
        description="test: 2 engines, 2 groups x 4 prompts",
        workload=lambda tok, seed: W.shared_prefix(
            tok, num_groups=2, prompts_per_group=4, system_prompt_len=300, question_len=30,
            output_len=6, seed=seed),
        stages=[W.Stage(4, 2)],
        system=SystemSpec(engines=2, num_gpu_blocks=1000, time_scale=0.5),
        profiles=["round-robin"],
    )


def _children() -> list[int]:
    """Live child processes of this test process."""
    me = os.getpid()
    return [st.pid for st in cpu.all_stats().values() if st.ppid == me]


@needs_sglang
def test_peer_policy_runs_next_to_a_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(runner.PRESETS, "tiny-peers", _tiny())
    before = set(_children())
    code = runner.main(["--preset", "tiny-peers", "--out", str(tmp_path), "--peers",
                        "sglang-router", "--peer-policies", "round_robin,consistent_hash"])
    assert code == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    rows = ["round-robin", "sglang-router:round_robin"]
    assert data["rows"] == rows
    assert data["kinds"] == {"round-robin": "profile", "sglang-router:round_robin": "peer"}
    # sglang-router 0.3.2 has no consistent_hash: skipped, and said so.
    assert "consistent_hash" in data["peers"]["sglang-router"]["skipped"]
    assert "skipping sglang-router:consistent_hash" in printed
    for row in rows:
        s = data["profiles"][row]
        assert s["requests"] == data["requests"] > 0
        assert s["errors"] == 0, row
        assert s["ttft_p50_s"] > 0 and s["output_tok_s"] > 0
        assert s["control_plane_cpu_s"] > 0 and s["engines_cpu_s"] > 0, row
        assert s["control_plane_cpu_s_per_1k"] > 0 and s["engines_cpu_s_per_1k"] > 0
        assert row in printed
        # Both engines served (round robin), counted at the engines for the peer.
        assert sorted(s["load_spread"]["per_endpoint"]) == ["sim-0", "sim-1"]
    assert len(data["repeats"]) == 1
    assert (tmp_path / "logs" / "sglang-router-round_robin" / "logs"
            / "sglang-router.log").exists()
    for png in ("ttft_vs_rate.png", "cache_hit_rate.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = json.loads((tmp_path / "requests.json").read_text())
    # The same requests at the same moments for both rows.
    ids = {row: sorted(r["id"] for r in raw[row]) for row in rows}
    assert ids["round-robin"] == ids["sglang-router:round_robin"]
    assert set(_children()) <= before


@needs_sglang
def test_failure_mid_run_leaves_nothing_running(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []
    real_start = peers.PeerRouter.start

    def start(self: peers.PeerRouter, timeout: float = 60.0) -> peers.PeerRouter:
        r = real_start(self, timeout)
        started.extend([p for p in [self.pid, *(q.pid for q in self.fleet.procs())] if p])
        return r

    async def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # as Ctrl-C would, in the middle of sending

    monkeypatch.setattr(peers.PeerRouter, "start", start)
    monkeypatch.setattr(runner, "run_requests", boom)
    monkeypatch.setitem(runner.PRESETS, "tiny-peers", _tiny())
    code = runner.main(["--preset", "tiny-peers", "--out", str(tmp_path), "--profiles", "none",
                        "--peers", "sglang-router", "--peer-policies", "round_robin"])
    assert code == 130
    assert len(started) == 3  # the router and two engines were running
    assert all(cpu.read_stat(pid) is None for pid in started)
