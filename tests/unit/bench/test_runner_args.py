"""`infermesh bench` command line: peers, peer policies, repeat and time scale are checked before
anything starts; a peer that is not installed is one line and exit status 2."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from infermesh.services.bench import peers, runner


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        runner.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_defaults() -> None:
    args = runner.parse_args([])
    assert args.peers == [] and args.peer_policies is None
    assert args.repeat == 1 and args.time_scale is None and args.profile_list is None


def test_peers_policies_repeat_and_time_scale_parse() -> None:
    args = runner.parse_args(["--peers", "sglang-router,vllm-router", "--peer-policies",
                              "cache_aware,kv_aware", "--repeat", "3", "--time-scale", "0.5",
                              "--profiles", "random,default"])
    assert args.peers == ["sglang-router", "vllm-router"]
    assert args.peer_policies == ["cache_aware", "kv_aware"]
    assert args.repeat == 3 and args.time_scale == 0.5
    assert args.profile_list == ["random", "default"]
    only_peers = runner.parse_args(["--peers", "vllm-router", "--profiles", "none"])
    assert only_peers.profile_list == []


def test_unknown_peer_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["--peers", "sglang-router,nginx"])
    assert "unknown peer nginx" in err and "vllm-router" in err


def test_unknown_peer_policy_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["--peers", "vllm-router", "--peer-policies", "cache-aware"])
    assert "unknown peer policy cache-aware" in err


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_repeat_below_one_is_an_error(capsys: pytest.CaptureFixture[str], value: str) -> None:
    assert "--repeat" in _error(capsys, ["--repeat", value])


@pytest.mark.parametrize("value", ["0", "-2", "nan", "inf"])
def test_time_scale_must_be_positive(capsys: pytest.CaptureFixture[str], value: str) -> None:
    assert "--time-scale" in _error(capsys, ["--time-scale", value])


def test_combinations_that_cannot_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert "cannot go with --url" in _error(
        capsys, ["--peers", "sglang-router", "--url", "http://127.0.0.1:1"])
    assert "needs --peers" in _error(capsys, ["--peer-policies", "cache_aware"])
    assert "nothing to run" in _error(capsys, ["--profiles", "none"])


def test_run_rejects_a_repeat_below_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="repeat"):
        runner.run(runner.PRESETS["quick"], tmp_path, repeat=0)


def test_missing_peer_exits_2_with_the_install_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(peers, "find_executable", lambda name: None)
    code = runner.main(["--peers", "sglang-router", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "sglang-router is not installed" in err
    assert "pip install 'infermesh[peers]'" in err
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def _fake_router(tmp_path: Path, name: str, policies: str) -> Path:
    exe = tmp_path / name
    exe.write_text(f"#!/bin/sh\necho 'usage: {name} [--policy {{{policies}}}]'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_policies_a_peer_lacks_are_skipped_with_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_router(tmp_path, "sglang-router", "random,round_robin,cache_aware,power_of_two")
    monkeypatch.setattr(peers, "find_executable", lambda name: fake)
    (plan,) = peers.resolve(["sglang-router"], None, engines=4)
    assert plan.policies == ["cache_aware", "power_of_two", "round_robin", "random"]
    assert "has no consistent_hash policy" in plan.skipped["consistent_hash"]
    assert "round_robin" in plan.skipped["consistent_hash"]  # says what it offers
    assert plan.rows()[0] == "sglang-router:cache_aware"
    # A subset; power_of_two cannot pick two of one engine; kv_aware is vllm-router's only.
    (one,) = peers.resolve(["sglang-router"], ["power_of_two", "kv_aware", "random"], engines=1)
    assert one.policies == ["random"]
    assert "2 engines" in one.skipped["power_of_two"]
    assert "kv_aware" in one.skipped


def test_executables_are_found_next_to_python_first(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    venv_exe = _fake_router(bin_dir, "vllm-router", "random")
    path_dir = tmp_path / "path"
    path_dir.mkdir()
    _fake_router(path_dir, "vllm-router", "random")
    _fake_router(path_dir, "sglang-router", "random")
    monkeypatch.setattr(peers.sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", str(path_dir) + os.pathsep + os.environ.get("PATH", ""))
    assert peers.find_executable("vllm-router") == venv_exe
    assert peers.find_executable("sglang-router") == path_dir / "sglang-router"
    assert peers.find_executable("no-such-router-here") is None


def test_metric_values_reads_prometheus_text() -> None:
    text = "\n".join([
        "# TYPE vllm:request_success_total counter",
        'vllm:request_success_total{engine="0",finished_reason="length"} 12.0',
        'vllm:request_success_total{engine="0",finished_reason="stop"} 3.0',
        "vllm:request_success_created 1.7e9",
        'router_lookups_total{result="miss"} 4',
        'router_lookups_total{result="hit"} 1',
    ])
    assert sum(peers.metric_values(text, "vllm:request_success_total")) == 15
    assert peers.metric_values(text, "vllm:request_success") == []
    assert peers.metric_values(text, "router_lookups_total", 'result="miss"') == [4.0]


def test_peer_fleet_and_router_command_lines(tmp_path: Path) -> None:
    from infermesh.services.system.spec import SystemSpec

    spec = SystemSpec(engines=2, num_gpu_blocks=100, time_scale=0.5,
                      engine_args="--prefill-tokens-per-s 12000")
    fleet = peers.SimFleet(spec, tmp_path)  # planned, nothing started
    # Only the engines of the plan our profiles run, with the preset's engine settings.
    assert {p.kind for p in fleet.sims} == {"sim"} and fleet.pods == ("sim-0", "sim-1")
    argv = " ".join(fleet.sims[0].argv)
    assert "--time-scale 0.5" in argv and "--num-gpu-blocks 100" in argv
    assert "--prefill-tokens-per-s 12000" in argv
    assert len(set(fleet.urls)) == 2 and fleet.block_size == 16

    kv = peers.PeerRouter(peers.PEERS["vllm-router"], Path("/bin/vllm-router"), "kv_aware",
                          fleet, model="tiny", log_dir=tmp_path)
    a = kv.process.argv
    assert a[a.index("--policy") + 1] == "kv_aware"
    assert a[a.index("--worker-urls") + 1:a.index("--worker-urls") + 3] == fleet.urls
    for url, (events, replay) in zip(fleet.urls, fleet.kv_endpoints, strict=True):
        assert f"{url}={events}" in a and f"{url}={replay}" in a
    assert a[a.index("--kv-event-block-size") + 1] == "16"
    assert a[a.index("--kv-event-model") + 1] == "tiny"
    assert kv.process.env["VLLM_ROUTER_TOKENIZER"] == str(fleet.plan.model_dir)
    assert kv.url.startswith("http://127.0.0.1:")

    rr = peers.PeerRouter(peers.PEERS["vllm-router"], Path("/bin/vllm-router"), "round_robin",
                          fleet, model="tiny", log_dir=tmp_path)
    assert "--kv-event-source" not in rr.process.argv and rr.process.env == {}

    sg = peers.PeerRouter(peers.PEERS["sglang-router"], Path("/bin/sglang-router"),
                          "cache_aware", fleet, model="tiny", log_dir=tmp_path)
    b = sg.process.argv
    assert b[:2] == ["/bin/sglang-router", "launch"]
    assert b[b.index("--policy") + 1] == "cache_aware"
    assert sg.process.log == tmp_path / "sglang-router.log"


def test_peers_need_simulated_engines(tmp_path: Path) -> None:
    from infermesh.services.system.spec import SystemSpec

    with pytest.raises(peers.PeerError, match="simulated engines"):
        peers.SimFleet(SystemSpec(engine="vllm", engines=2), tmp_path)


def test_a_profiles_file_goes_to_the_ingresses_and_the_scheduler(tmp_path: Path) -> None:
    from infermesh.libs.scheduling.config import DEFAULT_PIPELINE_YAML
    from infermesh.services.system.spec import SystemSpec

    f = tmp_path / "candidates.yaml"
    f.write_text(DEFAULT_PIPELINE_YAML)
    args = runner.parse_args(["--profiles-file", str(f), "--profiles", "default"])
    assert args.profiles_file == f
    base = SystemSpec(engines=2, settings={"ingress": {"schedule_timeout_s": 3}})
    spec = runner.with_profiles_file(base, f)
    assert spec.settings["ingress"] == {"schedule_timeout_s": 3, "profiles_file": str(f)}
    assert spec.settings["scheduler"] == {"profiles_file": str(f)}
    assert "scheduler" not in base.settings  # the preset's spec is not changed
    # A bad file stops the bench before anything starts.
    bad = tmp_path / "bad.yaml"
    bad.write_text("profiles: [{name: x, plugins: [{ref: nowhere}]}]\n")
    with pytest.raises(ValueError, match="nowhere"):
        runner.with_profiles_file(base, bad)


def test_a_profiles_file_cannot_go_with_a_url(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        runner.parse_args(["--profiles-file", "x.yaml", "--url", "http://h:1"])
    assert "--profiles-file" in capsys.readouterr().err


def test_stages_replace_the_presets_and_keep_its_knee(capsys: pytest.CaptureFixture[str]) -> None:
    args = runner.parse_args(["--preset", "saturation", "--stages", "25:2.5, 45:8"])
    assert [(s.rate_qps, s.duration_s) for s in args.stages] == [(25.0, 2.5), (45.0, 8.0)]
    preset = runner.with_stages(runner.PRESETS["saturation"], args.stages)
    assert preset.stages == args.stages and preset.knee_stage == 1
    # Fewer stages than the knee's index: no knee.
    one = runner.with_stages(runner.PRESETS["saturation"], args.stages[:1])
    assert one.knee_stage is None
    assert runner.PRESETS["saturation"].stages[1].duration_s == 2.5  # the preset is unchanged
    work = runner.build_workload(preset, 0, 4.0, "m")
    assert work.knee_stage == 1
    sent = [r.arrival_s for r in work.requests]
    # 25 x 2.5 + 45 x 8 modelled = 422 requests (Poisson, 4 sigma), over 42 wall seconds.
    assert abs(len(sent) - 422.5) < 4 * 422.5 ** 0.5 and max(sent) < 42.0
    for bad in ("45", "45:0", "-1:2", "a:b", ",", "45:inf"):
        assert "--stages" in _error(capsys, ["--stages", bad]), bad
    assert runner.parse_args([]).stages is None
