"""The launched engine's command line and environment: KV events for every role, and for the
prefill and decode roles vLLM's NixlConnector on the CPU with a side channel of its own."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from infermesh.libs import vllm_ext
from infermesh.libs.config import ConfigError, load_config
from infermesh.services.agent.__main__ import main
from infermesh.services.agent.config import AgentConfig
from infermesh.services.agent.service import AgentService
from infermesh.services.agent.vllm_launcher import (
    StorageTier,
    VllmPorts,
    VllmProcess,
    kv_transfer_config,
    remove_offload_regions,
)

PORTS = VllmPorts(http=8100, kv=5557, replay=5558, nixl=5600)


def engine(role: Any = "both", extra: list[str] | None = None, **kw: Any) -> VllmProcess:
    return VllmProcess("vllm", "/models/tiny", "tiny", PORTS, extra or ["--block-size", "32"],
                       role=role, **kw)


def transfer_of(argv: list[str]) -> dict[str, Any] | None:
    """The ``--kv-transfer-config`` the command line gives (None: none)."""
    if "--kv-transfer-config" not in argv:
        return None
    assert argv.count("--kv-transfer-config") == 1, argv
    value: dict[str, Any] = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    return value


def test_both_has_no_connector_and_no_side_channel() -> None:
    e = engine()
    argv = e.argv()
    assert transfer_of(argv) is None
    assert not any(k.startswith("VLLM_NIXL") for k in e.environ())
    assert argv[:3] == ["vllm", "serve", "/models/tiny"]
    assert argv[-2:] == ["--block-size", "32"]
    events = json.loads(argv[argv.index("--kv-events-config") + 1])
    assert events["endpoint"] == "tcp://*:5557" and events["replay_endpoint"] == "tcp://*:5558"


@pytest.mark.parametrize(("role", "kv_role"), [("prefill", "kv_producer"),
                                                ("decode", "kv_consumer")])
def test_prefill_and_decode_get_nixl_on_the_cpu(role: str, kv_role: str) -> None:
    e = engine(role)
    argv = e.argv()
    assert transfer_of(argv) == {"kv_connector": "NixlConnector", "kv_role": kv_role,
                                 "kv_buffer_device": "cpu"}
    # The connector comes before the operator's arguments; KV events stay on.
    assert argv.index("--kv-transfer-config") < argv.index("--block-size")
    assert "--kv-events-config" in argv and "--enable-prefix-caching" in argv
    assert e.environ() == {"VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
                           "VLLM_NIXL_SIDE_CHANNEL_PORT": "5600",
                           "INFERMESH_NIXL_PROGRESS_THREAD": "0"}


def test_the_prefill_lease_is_set_when_asked_for() -> None:
    assert transfer_of(engine("prefill", kv_lease_s=90).argv())["kv_connector_extra_config"] == {  # type: ignore[index]
        "kv_lease_duration": 90}
    # Only a prefill engine holds blocks for others; vLLM's default when none is given.
    assert "kv_connector_extra_config" not in transfer_of(engine("decode", kv_lease_s=90).argv())  # type: ignore[operator]
    assert "kv_connector_extra_config" not in transfer_of(engine("prefill").argv())  # type: ignore[operator]
    assert kv_transfer_config("both", kv_lease_s=90) is None


def test_the_side_channel_host_and_extra_env() -> None:
    e = engine("decode", nixl_host="10.0.0.7", env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert e.environ() == {"VLLM_CPU_KVCACHE_SPACE": "1",
                           "VLLM_NIXL_SIDE_CHANNEL_HOST": "10.0.0.7",
                           "VLLM_NIXL_SIDE_CHANNEL_PORT": "5600",
                           "INFERMESH_NIXL_PROGRESS_THREAD": "0"}
    # NIXL's progress thread only when asked for (it busy-polls a core on the CPU).
    assert engine("prefill", nixl_progress_thread=True).environ()[
        "INFERMESH_NIXL_PROGRESS_THREAD"] == "1"
    assert "--host" in e.argv() and e.argv()[e.argv().index("--host") + 1] == "127.0.0.1"


@pytest.mark.parametrize("given", [
    ["--kv-transfer-config", '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'],
    ['--kv-transfer-config={"kv_connector":"NixlConnector","kv_role":"kv_both"}'],
    ["--kv-transfer-config.kv_role", "kv_both"],
])
def test_the_operators_kv_transfer_config_wins(given: list[str]) -> None:
    e = engine("prefill", extra=given)
    argv = e.argv()
    assert argv[-len(given):] == given
    assert sum(a.startswith("--kv-transfer-config") for a in argv) == 1
    assert e.environ()["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5600"  # still its own port


def test_a_pd_engine_without_a_side_channel_port_is_refused() -> None:
    with pytest.raises(ValueError, match="side-channel port"):
        VllmProcess("vllm", "m", "m", VllmPorts(1, 2, 3), [], role="decode")


def test_ports_pick_a_side_channel_only_when_asked() -> None:
    assert VllmPorts.pick(1, 2, 3).nixl == 0
    assert VllmPorts.pick(1, 2, 3, nixl=5601).nixl == 5601
    free = VllmPorts.pick(1, 2, 3, nixl=0).nixl
    assert free > 0 and free not in (1, 2, 3)


def agent_config(*argv: str) -> AgentConfig:
    """The config `infermesh agent ARGV` builds (``--`` passes the rest to vLLM)."""
    args = list(argv)
    extra: list[str] = []
    if "--" in args:
        args, extra = args[:args.index("--")], args[args.index("--") + 1:]
    ns = main.parser().parse_args(args)
    if extra:
        ns.vllm_args = extra
    return load_config(AgentConfig, ns, env_prefix="X_UNUSED", env={})


def launched(cfg: AgentConfig) -> VllmProcess:
    agent = AgentService(cfg)
    agent._ctx.term()
    assert agent.vllm is not None
    return agent.vllm


def test_the_agents_knobs_reach_the_engine() -> None:
    vllm = launched(agent_config(
        "--launch-vllm", "/models/tiny", "--model", "tiny", "--role", "prefill",
        "--vllm-nixl-port", "5611", "--vllm-nixl-host", "10.1.2.3", "--vllm-kv-lease-s", "45",
        "--vllm-nixl-progress-thread", "--", "--block-size", "32"))
    assert vllm.ports.nixl == 5611
    assert transfer_of(vllm.argv()) == {
        "kv_connector": "NixlConnector", "kv_role": "kv_producer", "kv_buffer_device": "cpu",
        "kv_connector_extra_config": {"kv_lease_duration": 45}}
    assert vllm.environ() == {"VLLM_NIXL_SIDE_CHANNEL_HOST": "10.1.2.3",
                              "VLLM_NIXL_SIDE_CHANNEL_PORT": "5611",
                              "INFERMESH_NIXL_PROGRESS_THREAD": "1", "PYTHONHASHSEED": "0"}
    assert vllm.argv()[-2:] == ["--block-size", "32"]


def test_the_agent_picks_a_free_side_channel_for_pd_roles_only() -> None:
    decode = launched(agent_config("--launch-vllm", "/m", "--role", "decode"))
    assert decode.ports.nixl > 0
    assert decode.environ()["VLLM_NIXL_SIDE_CHANNEL_PORT"] == str(decode.ports.nixl)
    assert transfer_of(decode.argv())["kv_role"] == "kv_consumer"  # type: ignore[index]
    both = launched(agent_config("--launch-vllm", "/m", "--vllm-nixl-port", "5611"))
    assert both.ports.nixl == 0 and transfer_of(both.argv()) is None
    assert both.environ() == {"PYTHONHASHSEED": "0"}


@pytest.mark.parametrize(("args", "complaint"), [
    (["--vllm-nixl-port", "70000"], "vllm_nixl_port"),
    (["--vllm-kv-lease-s", "-1"], "vllm_kv_lease_s"),
])
def test_bad_nixl_knobs_are_refused(args: list[str], complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        agent_config("--launch-vllm", "/m", "--role", "prefill", *args)


async def test_the_spawned_engine_sees_the_side_channel(tmp_path: Path) -> None:
    """What the process really gets: the command line and the environment, merged with the
    agent's own (a stand-in `vllm` writes both down)."""
    out = tmp_path / "seen.json"
    fake = tmp_path / "vllm"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys, time\n"
        f"open({str(out)!r} + '.tmp', 'w').write(json.dumps({{'argv': sys.argv[1:], "
        "'env': dict(os.environ)}))\n"
        f"os.rename({str(out)!r} + '.tmp', {str(out)!r})\n"
        "time.sleep(60)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    e = VllmProcess(str(fake), "/models/tiny", "tiny", PORTS, [], role="decode",
                    env={"EXTRA": "1"})
    await e.start()
    try:
        for _ in range(200):
            if out.exists():
                break
            await asyncio.sleep(0.05)
        seen = json.loads(out.read_text())
    finally:
        await e.stop(timeout=5)
    assert seen["argv"] == e.argv()[1:]
    env = seen["env"]
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5600"
    assert env["INFERMESH_NIXL_PROGRESS_THREAD"] == "0"
    assert env["EXTRA"] == "1" and env["PATH"] == os.environ["PATH"]
    assert env["PYTHONHASHSEED"] == os.environ.get("PYTHONHASHSEED", "0")


def test_the_progress_thread_hook_needs_nixl_only_when_asked() -> None:
    """The hook module imports without NIXL (the project's venv has none) and does nothing."""
    from infermesh.services.agent import nixl_hook

    assert nixl_hook.ENV == "INFERMESH_NIXL_PROGRESS_THREAD"
    try:
        import nixl  # noqa: F401
    except ImportError:
        assert nixl_hook.without_progress_thread() is False


# ---------------------------------------------------------------------- the storage tier


def test_a_storage_dir_gives_the_offloading_connector_with_our_tier() -> None:
    vllm = launched(agent_config(
        "--launch-vllm", "/models/tiny", "--model", "tiny", "--pod", "vllm-3",
        "--vllm-storage-dir", "/shared/kv", "--vllm-storage-capacity-bytes", "1000000",
        "--vllm-offload-cpu-bytes", "67108864", "--vllm-hash-seed", "7",
        "--", "--block-size", "32"))
    cfg = transfer_of(vllm.argv())
    assert cfg is not None
    assert cfg["kv_connector"] == "OffloadingConnector" and cfg["kv_role"] == "kv_both"
    assert cfg["engine_id"] == "infermesh-vllm-3" == vllm.engine_id
    extra = cfg["kv_connector_extra_config"]
    assert extra["spec_module_path"] == vllm_ext.SPEC_MODULE
    assert extra["spec_name"] == vllm_ext.SPEC_NAME
    assert extra["cpu_bytes_to_use"] == 64 << 20
    [tier] = extra["secondary_tiers"]
    assert tier["type"] == vllm_ext.TIER_TYPE and tier["module_path"] == vllm_ext.TIER_MODULE
    assert (tier["root_dir"], tier["capacity_bytes"]) == ("/shared/kv", 1000000)
    assert tier["locality"] == "REMOTE" and tier["enable_kv_events"] is True
    assert vllm.environ()["PYTHONHASHSEED"] == "7"
    assert vllm.argv()[-2:] == ["--block-size", "32"]


def test_without_a_storage_dir_nothing_changes() -> None:
    vllm = launched(agent_config("--launch-vllm", "/m", "--vllm-offload-cpu-bytes", "1"))
    assert transfer_of(vllm.argv()) is None and vllm.storage is None


@pytest.mark.parametrize(("args", "complaint"), [
    (["--role", "prefill", "--vllm-nixl-port", "5611"], "cannot be combined with role prefill"),
    (["--role", "decode"], "cannot be combined with role decode"),
    (["--vllm-storage-capacity-bytes", "-1"], "vllm_storage_capacity_bytes"),
    (["--vllm-offload-cpu-bytes", "0"], "vllm_offload_cpu_bytes"),
    (["--", "--kv-transfer-config", "{}"], "drop the one in the extra vLLM arguments"),
])
def test_storage_knobs_that_cannot_work_are_refused(args: list[str], complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        agent_config("--launch-vllm", "/m", "--vllm-storage-dir", "/shared/kv", *args)


def test_a_pd_engine_with_a_storage_tier_is_refused_by_the_launcher() -> None:
    with pytest.raises(ValueError, match="storage tier"):
        engine("prefill", storage=StorageTier("/shared/kv"))


def test_remove_offload_regions_removes_only_that_engines_files(tmp_path: Path) -> None:
    for name in ["vllm_offload_infermesh-a.mmap", "vllm_offload_infermesh-a_dp1.mmap",
                 "vllm_offload_infermesh-ab.mmap", "vllm_offload_other.mmap", "psm_1"]:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_offload_regions("infermesh-a", str(tmp_path))
    assert sorted(Path(p).name for p in removed) == [
        "vllm_offload_infermesh-a.mmap", "vllm_offload_infermesh-a_dp1.mmap"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "psm_1", "vllm_offload_infermesh-ab.mmap", "vllm_offload_other.mmap"]


async def test_the_region_a_killed_engine_left_is_removed_before_the_next_start(
        tmp_path: Path) -> None:
    """An engine SIGKILLed leaves its offload region; the supervisor removes it before the
    restart (vLLM would join the stale file instead of creating a fresh one)."""
    fake = tmp_path / "vllm"
    shm = tmp_path / "shm"
    shm.mkdir()
    starts = tmp_path / "starts"
    # The stand-in engine creates its region like vLLM, then dies as if killed.
    fake.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"open({str(starts)!r}, 'a').write(str(os.path.exists({str(shm)!r} + "
        "'/vllm_offload_e1.mmap')) + '\\n')\n"
        f"open({str(shm)!r} + '/vllm_offload_e1.mmap', 'w').write('region')\n"
        "os._exit(9)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    (shm / "vllm_offload_e1.mmap").write_text("left by an earlier agent")
    e = VllmProcess(str(fake), "/models/tiny", "tiny", PORTS, [],
                    storage=StorageTier(str(tmp_path / "kv")), engine_id="e1",
                    max_backoff_s=0.1)
    e.shm_dir = str(shm)
    await e.start()
    try:
        for _ in range(100):
            if starts.exists() and len(starts.read_text().split()) >= 2:
                break
            await asyncio.sleep(0.05)
    finally:
        await e.stop(timeout=5)
    assert starts.read_text().split()[:2] == ["False", "False"]
    assert not (shm / "vllm_offload_e1.mmap").exists()
