"""`infermesh up --loras`: the plan gives every engine the adapters (made in the state folder
by the repo's own code, or the paths given), the LoRA directory and runtime updating;
prepare_state builds the adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infermesh.libs.config import ConfigError
from infermesh.services.system.plan import plan
from infermesh.services.system.run import make_adapters
from infermesh.services.system.spec import SystemSpec


def _flag(argv: tuple[str, ...], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_sims_agents_and_ingress_get_the_adapters(tmp_path: Path) -> None:
    p = plan(SystemSpec(loras=["a", "b=/x/b"], max_loras=2, engines=2, free_ports=True,
                        state_dir=str(tmp_path)))
    lora_dir = tmp_path.resolve() / "loras"
    assert p.lora_dir == lora_dir
    assert p.lora_modules() == {"a": lora_dir / "a", "b": Path("/x/b")}
    for sim in p.of_kind("sim"):
        assert _flag(sim.argv, "--loras") == f"a={lora_dir / 'a'},b=/x/b"
        assert _flag(sim.argv, "--lora-dir") == str(lora_dir)
        assert _flag(sim.argv, "--max-loras") == "2"
        assert "--runtime-lora-updating" in sim.argv
    for agent in p.of_kind("agent"):
        assert _flag(agent.argv, "--lora-dir") == str(lora_dir)
    # The default profile routes by adapter (lora-filter, lora-affinity): no profile to set.
    assert "--profile" not in p.of_kind("ingress")[0].argv


def test_vllm_agents_launch_with_the_adapters(tmp_path: Path) -> None:
    p = plan(SystemSpec(engine="vllm", loras=["a"], engines=2, free_ports=True,
                        state_dir=str(tmp_path)))
    for agent in p.of_kind("agent"):
        assert _flag(agent.argv, "--vllm-loras") == f"a={p.lora_dir / 'a'}"
        assert _flag(agent.argv, "--lora-dir") == str(p.lora_dir)
        assert "--vllm-lora-runtime-updating" in agent.argv


def test_no_loras_no_lora_flag(tmp_path: Path) -> None:
    p = plan(SystemSpec(free_ports=True, state_dir=str(tmp_path)))
    assert not any(a.startswith("--") and "lora" in a for proc in p.processes for a in proc.argv)
    assert "--profile" not in p.of_kind("ingress")[0].argv


@pytest.mark.parametrize("bad", [["a/b"], [".x"], ["a="]])
def test_bad_names_are_refused(bad: list[str], tmp_path: Path) -> None:
    with pytest.raises((ConfigError, ValueError)):
        plan(SystemSpec(loras=bad, free_ports=True, state_dir=str(tmp_path)))


def test_prepare_state_makes_the_named_adapters(tmp_path: Path, model_dir: Path) -> None:
    p = plan(SystemSpec(loras=["a", "b=/x/b"], free_ports=True, state_dir=str(tmp_path)))
    make_adapters(p)
    cfg = json.loads((p.lora_dir / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(p.model_dir)
    assert not (p.lora_dir / "b").exists()  # given by path: not made
