"""The system plan: one place for pod names, the port layout and every process's command line,
built from the services' own config classes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from infermesh.libs.config import ConfigError, default_of, load_config, to_argv
from infermesh.services.console.config import ConsoleConfig
from infermesh.services.sim.config import SimConfig
from infermesh.services.system.plan import CONFIGS, STAGE, VLLM_CPU_BLOCK_SIZE, plan, pod_name
from infermesh.services.system.spec import SystemSpec
from infermesh.services.system.up import build_parser, spec_from_args, summary


def flags(argv: tuple[str, ...] | list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    args = list(argv)
    if "--" in args:
        args = args[:args.index("--")]
    for i, a in enumerate(args):
        if a.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[a] = args[i + 1]
    return out


def parsed(kind: str, argv: tuple[str, ...]) -> Any:
    """The config the service itself builds from the plan's command line."""
    import importlib

    module = argv[2]
    main = importlib.import_module(module + ".__main__").main
    args = list(argv[3:])
    extra: list[str] = []
    if "--" in args:
        args, extra = args[:args.index("--")], args[args.index("--") + 1:]
    ns = main.parser().parse_args(args)
    if extra:
        ns.vllm_args = extra
    return load_config(CONFIGS[kind], ns, env_prefix="X_UNUSED", env={})


def test_port_layout_and_pod_names(tmp_path: Path) -> None:
    p = plan(SystemSpec(engines=3, state_dir=str(tmp_path), sim_processes="each"))
    assert p.pods == ("sim-0", "sim-1", "sim-2") == tuple(pod_name("sim", i) for i in range(3))
    for i in range(3):
        sim = parsed("sim", p.process(f"sim-{i}").argv)
        assert (sim.http_port, sim.kv_port, sim.engines) == (8100 + i, 5557 + 2 * i, 1)
        agent = parsed("agent", p.process(f"agent-sim-{i}").argv)
        assert agent.pod == f"sim-{i}"
        assert agent.engine_url == f"http://127.0.0.1:{8100 + i}"
        assert agent.kv_endpoint == f"tcp://127.0.0.1:{5557 + 2 * i}"
        assert agent.replay_endpoint == f"tcp://127.0.0.1:{5557 + 2 * i + 1}"
    assert parsed("ingress", p.process("ingress-0").argv).http_port == 8000
    # Every process's ops port is its own, and every one is printed in the summary's links.
    ops = [parsed(q.kind, q.argv).http_port for q in p.processes
           if q.kind in ("agent", "tokenizer", "indexer", "scheduler")]
    assert ops == list(range(8300, 8300 + len(ops)))
    ports = [port.number for q in p.processes for port in q.ports]
    assert len(ports) == len(set(ports)), "two processes share a port"


def test_one_sim_process_binds_a_run_of_ports(tmp_path: Path) -> None:
    p = plan(SystemSpec(engines=3, state_dir=str(tmp_path), sim_processes="one",
                        free_ports=True))
    (sim,) = p.of_kind("sim")
    cfg = parsed("sim", sim.argv)
    assert cfg.engines == 3 and sim.pods == p.pods
    assert p.layout.engine_http == tuple(cfg.http_port + i for i in range(3))
    assert p.layout.engine_kv == tuple(cfg.kv_port + 2 * i for i in range(3))


def test_replicas_and_a_nats_cluster(tmp_path: Path) -> None:
    p = plan(SystemSpec(engines=1, schedulers=2, indexers=3, ingresses=2, nats_cluster=3,
                        state_dir=str(tmp_path)))
    assert [q.name for q in p.of_kind("nats")] == ["nats-0", "nats-1", "nats-2"]
    assert p.nats_url == "nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224"
    assert p.micro_services() == {"infermesh-tokenizer": 1, "infermesh-indexer": 3,
                                  "infermesh-scheduler": 2}
    assert p.ingress_urls == ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]
    for q in p.processes:
        if q.kind not in ("nats", "sim"):
            assert parsed(q.kind, q.argv).nats_url == p.nats_url


def test_defaults_come_from_the_services(tmp_path: Path) -> None:
    p = plan(SystemSpec(state_dir=str(tmp_path)))
    sim = parsed("sim", p.of_kind("sim")[0].argv)
    # Nothing restated: the plan leaves block size and capacity to the simulator.
    assert "--block-size" not in p.of_kind("sim")[0].argv
    assert sim.block_size == default_of(SimConfig, "block_size")
    assert sim.num_gpu_blocks == default_of(SimConfig, "num_gpu_blocks")
    p = plan(SystemSpec(state_dir=str(tmp_path), block_size=32, num_gpu_blocks=100))
    sim = parsed("sim", p.of_kind("sim")[0].argv)
    assert (sim.block_size, sim.num_gpu_blocks) == (32, 100)


def test_vllm_engines_get_the_block_size_asked_for(tmp_path: Path) -> None:
    p = plan(SystemSpec(engine="vllm", engines=2, block_size=64, state_dir=str(tmp_path)))
    assert p.pods == ("vllm-0", "vllm-1") and not p.of_kind("sim")
    for i, q in enumerate(p.of_kind("agent")):
        cfg = parsed("agent", q.argv)
        assert cfg.launch_vllm and cfg.pod == f"vllm-{i}"
        args = cfg.vllm_args
        assert args[args.index("--block-size") + 1] == "64"
        assert args.count("--block-size") == 1
        assert (cfg.vllm_port, cfg.vllm_kv_port, cfg.vllm_replay_port) == (
            8100 + i, 5557 + 2 * i, 5558 + 2 * i)
    default = plan(SystemSpec(engine="vllm", engines=1, state_dir=str(tmp_path)))
    args = parsed("agent", default.of_kind("agent")[0].argv).vllm_args
    assert args[args.index("--block-size") + 1] == str(VLLM_CPU_BLOCK_SIZE)


@pytest.mark.parametrize("block", [16, 48])
def test_a_block_size_vllm_on_cpu_refuses_is_refused(tmp_path: Path, block: int) -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        plan(SystemSpec(engine="vllm", block_size=block, state_dir=str(tmp_path)))


def test_settings_reach_the_services(tmp_path: Path) -> None:
    args = build_parser().parse_args([
        "--state-dir", str(tmp_path), "--set", "ingress.schedule_timeout_s=2.5",
        "--set", "sim.max-num-seqs=7", "--set", "scheduler.seed=3", "--engines", "2"])
    p = plan(spec_from_args(args))
    assert parsed("ingress", p.process("ingress-0").argv).schedule_timeout_s == 2.5
    assert all(parsed("sim", q.argv).max_num_seqs == 7 for q in p.of_kind("sim"))
    assert parsed("scheduler", p.process("scheduler-0").argv).seed == 3
    with pytest.raises(ConfigError, match="max_attempts"):
        plan(dataclasses.replace(p.spec, settings={"ingress": {"max_attempts": 0}}))
    with pytest.raises(ConfigError, match="no setting nosuch"):
        plan(dataclasses.replace(p.spec, settings={"agent": {"nosuch": 1}}))


def test_credentials_are_files_in_the_environment(tmp_path: Path) -> None:
    p = plan(SystemSpec(engines=1, state_dir=str(tmp_path)))
    for q in p.processes:
        if q.kind in ("nats", "sim"):
            assert not any("CREDENTIALS" in k for k in q.env), q.name
            continue
        user = "agent-sim-0" if q.kind == "agent" else q.kind
        key = f"INFERMESH_{q.kind.upper()}_NATS_CREDENTIALS"
        assert q.env[key] == str(p.credentials(user)), q.name
        assert not any("password" in a for a in q.argv)
    # An external bus gets no identities unless asked.
    p = plan(SystemSpec(engines=1, state_dir=str(tmp_path), nats_url="nats://x:1"))
    assert not p.of_kind("nats") and p.nats_url == "nats://x:1"
    assert not any("CREDENTIALS" in k for q in p.processes for k in q.env)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_to_argv_is_the_inverse_of_the_flags(kind: str) -> None:
    """Every config field round-trips through the command line the plan builds."""
    cls = CONFIGS[kind]
    import importlib

    main = importlib.import_module(f"infermesh.services.{kind}.__main__").main
    for f in dataclasses.fields(cls):
        value = default_of(cls, f.name)
        if isinstance(value, bool):
            value = not value
        elif isinstance(value, (int, float)) and value > 1:
            value = value * 2 if isinstance(value, int) else value * 1.5
        argv = to_argv(cls, {f.name: value})
        cfg = load_config(cls, main.parser().parse_args(argv), env_prefix="X_UNUSED", env={})
        assert getattr(cfg, f.name) == value, (f.name, argv)


def test_too_few_vllm_blocks_for_its_context_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max model length"):
        plan(SystemSpec(engine="vllm", num_gpu_blocks=10, state_dir=str(tmp_path)))


def test_autoscale_adds_the_autoscaler_deciding_the_pool(tmp_path: Path) -> None:
    assert not plan(SystemSpec(engines=1, state_dir=str(tmp_path))).of_kind("autoscaler")
    args = build_parser().parse_args([
        "--state-dir", str(tmp_path), "--engines", "2", "--autoscale", "--pool", "chat",
        "--set", "autoscaler.min_replicas=0", "--set", "autoscaler.mode=slo",
        "--set", "autoscaler.ttft_p90_target_s=0.5"])
    p = plan(spec_from_args(args))
    (a,) = p.of_kind("autoscaler")
    cfg = parsed("autoscaler", a.argv)
    assert (cfg.pools, cfg.min_replicas, cfg.mode, cfg.ttft_p90_target_s) == (
        ["chat"], 0, "slo", 0.5)
    assert cfg.nats_url == p.nats_url and a.health_url.endswith(f":{cfg.http_port}/health")
    assert a.env["INFERMESH_AUTOSCALER_NATS_CREDENTIALS"] == str(p.credentials("autoscaler"))
    # Its ops port is one of the run's, after the other services'.
    ops = [port.number for q in p.processes for port in q.ports
           if port.what == "/health and /metrics"]
    assert len(set(ops)) == len(ops) and ops[-1] == cfg.http_port
    with pytest.raises(ConfigError, match="slo mode needs"):
        plan(dataclasses.replace(p.spec, settings={"autoscaler": {"mode": "slo"}}))
    assert cfg.lease and cfg.lease_replicas == 1


def test_autoscaler_replicas_and_their_lease(tmp_path: Path) -> None:
    """`--autoscalers 2`: two replicas, ports of their own; on a NATS cluster of 3 the lease
    bucket gets 3 copies (unless set); every NATS node runs JetStream with a store of its own."""
    spec = SystemSpec(engines=1, autoscale=True, autoscalers=2, nats_cluster=3,
                      state_dir=str(tmp_path))
    p = plan(spec)
    reps = p.of_kind("autoscaler")
    assert [a.name for a in reps] == ["autoscaler-0", "autoscaler-1"]
    cfgs = [parsed("autoscaler", a.argv) for a in reps]
    assert len({c.http_port for c in cfgs}) == 2 and {c.lease_replicas for c in cfgs} == {3}
    stores = [a.argv[a.argv.index("-sd") + 1] for a in p.of_kind("nats")]
    assert len(set(stores)) == 3 and all("-js" in a.argv for a in p.of_kind("nats"))
    assert all(a.health_url.endswith("/healthz?js-enabled-only=true")
               for a in p.of_kind("nats"))
    one = plan(dataclasses.replace(spec, nats_cluster=1,
                                   settings={"autoscaler": {"lease_ttl_s": 2}}))
    assert {parsed("autoscaler", a.argv).lease_replicas for a in one.of_kind("autoscaler")} \
        == {1}
    with pytest.raises(ValueError, match="autoscalers must be at least 1"):
        SystemSpec(engines=1, autoscale=True, autoscalers=0)


def test_the_console_is_started_by_default_on_its_own_port_and_identity(tmp_path: Path) -> None:
    p = plan(SystemSpec(engines=2, state_dir=str(tmp_path)))
    (c,) = p.of_kind("console")
    cfg = parsed("console", c.argv)
    assert cfg.http_port == default_of(ConsoleConfig, "http_port") == 8090
    assert cfg.nats_url == p.nats_url and cfg.subject_prefix == "im"
    assert c.env["INFERMESH_CONSOLE_NATS_CREDENTIALS"] == str(p.credentials("console"))
    assert c.links["console"] == "http://127.0.0.1:8090/console"
    assert c.health_url == "http://127.0.0.1:8090/health" and c.after == ("nats",)
    # Started before the ingress (it sees the first routed request), stopped after it.
    kinds = [q.kind for q in p.processes]
    assert kinds.index("console") < kinds.index("ingress") and c.stage < STAGE["ingress"]
    assert any("http://127.0.0.1:8090/console" in line for line in summary(p))
    moved = plan(SystemSpec(engines=1, state_dir=str(tmp_path), console_port=9999,
                            settings={"console": {"decisions": 7}}))
    cfg = parsed("console", moved.of_kind("console")[0].argv)
    assert (cfg.http_port, cfg.decisions) == (9999, 7)
    off = plan(SystemSpec(engines=1, state_dir=str(tmp_path), console=False))
    assert not off.of_kind("console") and off.layout.console == ()
    assert not any("/console" in line for line in summary(off))


def test_storage_dir_reaches_every_sim_and_vllm_agent(tmp_path: Path) -> None:
    shared = tmp_path / "shared-kv"
    args = build_parser().parse_args([
        "--engines", "2", "--sim-processes", "each", "--state-dir", str(tmp_path),
        "--storage-dir", str(shared), "--storage-capacity-bytes", "1000000"])
    p = plan(spec_from_args(args))
    for i in range(2):
        sim = parsed("sim", p.process(f"sim-{i}").argv)
        assert (sim.storage_dir, sim.storage_capacity_bytes) == (str(shared), 1_000_000)
    # one process with every engine: the same directory
    one = plan(SystemSpec(engines=3, sim_processes="one", state_dir=str(tmp_path),
                          storage_dir=str(shared)))
    cfg = parsed("sim", one.of_kind("sim")[0].argv)
    assert cfg.storage_dir == str(shared) and cfg.storage_capacity_bytes == 0
    # vLLM: the agents launch their engines on it; the flags go before vLLM's own arguments
    v = plan(SystemSpec(engine="vllm", engines=2, state_dir=str(tmp_path),
                        storage_dir=str(shared), storage_capacity_bytes=5 << 30))
    for q in v.of_kind("agent"):
        own = list(q.argv[:q.argv.index("--")])
        assert own[own.index("--vllm-storage-dir") + 1] == str(shared)
        assert own[own.index("--vllm-storage-capacity-bytes") + 1] == str(5 << 30)
        assert "--storage-dir" not in q.argv[q.argv.index("--"):]


def test_storage_dir_is_made_absolute_and_off_by_default(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    p = plan(SystemSpec(engines=1, state_dir=str(tmp_path), storage_dir="kv"))
    assert parsed("sim", p.of_kind("sim")[0].argv).storage_dir == str(tmp_path / "kv")
    off = plan(SystemSpec(engines=1, state_dir=str(tmp_path)))
    assert "--storage-dir" not in off.of_kind("sim")[0].argv
    v = plan(SystemSpec(engine="vllm", engines=1, state_dir=str(tmp_path)))
    assert not [a for a in v.of_kind("agent")[0].argv if a.startswith("--vllm-storage")]
    with pytest.raises(ValueError, match="needs storage_dir"):
        SystemSpec(storage_capacity_bytes=10)
