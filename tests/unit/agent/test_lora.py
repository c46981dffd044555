"""The agent and LoRA: the launched engine's LoRA flags and environment, the heartbeat's adapters
(loaded ones from /v1/models on every scrape, loadable ones from the LoRA directory)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from infermesh.libs.config import ConfigError
from infermesh.libs.tinymodel.lora import build_adapter
from infermesh.services.agent.scrape import EngineLoad, adapters_in, scrape_engine
from infermesh.services.agent.service import AgentService
from infermesh.services.agent.vllm_launcher import LoraSettings
from tests.unit.agent.test_vllm_launcher import agent_config, launched


def test_lora_knobs_reach_the_engine() -> None:
    vllm = launched(agent_config(
        "--launch-vllm", "/models/tiny", "--vllm-loras", "a=/l/a,b=/l/b", "--vllm-max-loras", "2",
        "--vllm-max-lora-rank", "8", "--lora-dir", "/l", "--", "--block-size", "32"))
    argv = vllm.argv()
    assert "--enable-lora" in argv
    assert argv[argv.index("--max-loras") + 1] == "2"
    assert argv[argv.index("--max-lora-rank") + 1] == "8"
    i = argv.index("--lora-modules")
    assert argv[i + 1 : i + 3] == ["a=/l/a", "b=/l/b"]
    assert argv[-2:] == ["--block-size", "32"]  # the operator's flags last: they win
    env = vllm.environ()
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_LORA_RESOLVER_CACHE_DIR"] == "/l"


def test_no_lora_knob_no_lora_flag() -> None:
    vllm = launched(agent_config("--launch-vllm", "/m"))
    assert vllm.lora is None
    assert not any("lora" in a for a in vllm.argv())
    assert not any("LORA" in k for k in vllm.environ())
    on = launched(agent_config("--launch-vllm", "/m", "--vllm-enable-lora",
                               "--no-vllm-lora-runtime-updating"))
    assert on.lora == LoraSettings(runtime_updating=False)
    assert "--enable-lora" in on.argv() and "--lora-modules" not in on.argv()
    assert not any("LORA" in k for k in on.environ())


@pytest.mark.parametrize("args", [["--vllm-loras", "a"], ["--vllm-max-loras", "0"]])
def test_bad_lora_knobs_are_refused(args: list[str]) -> None:
    with pytest.raises(ConfigError):
        agent_config("--launch-vllm", "/m", *args)


def test_adapters_in_lists_peft_lora_folders(tmp_path: Path, model_dir: Path) -> None:
    build_adapter(tmp_path / "x", "x", model_dir)
    build_adapter(tmp_path / "y", "y", model_dir)
    (tmp_path / "not-an-adapter").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{")
    assert adapters_in(str(tmp_path)) == ["x", "y"]
    assert adapters_in("") == [] and adapters_in(str(tmp_path / "missing")) == []


@pytest.fixture
async def engine() -> AsyncIterator[tuple[str, list[str]]]:
    """A fake engine whose /v1/models lists the adapters in a list the test changes."""
    adapters: list[str] = ["a"]

    async def models(_: web.Request) -> web.Response:
        cards = [{"id": "tiny", "parent": None, "max_model_len": 2048}]
        cards += [{"id": a, "parent": "tiny"} for a in adapters]
        return web.json_response({"data": cards})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text='vllm:lora_requests_info{max_lora="2",running_lora_adapters='
                                 '"",waiting_lora_adapters=""} 1.0\n')

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), adapters
    finally:
        await server.close()


async def test_every_scrape_of_a_lora_engine_rereads_its_adapters(
    engine: tuple[str, list[str]]
) -> None:
    url, adapters = engine
    async with aiohttp.ClientSession() as http:
        first = await scrape_engine(http, url, "", None)
        assert (first.model, first.adapters, first.max_lora) == ("tiny", ["a"], 2)
        adapters[:] = ["a", "b"]  # loaded at runtime
        second = await scrape_engine(http, url, "tiny", first)
        assert second.adapters == ["a", "b"]
        adapters.remove("a")  # unloaded
        assert (await scrape_engine(http, url, "tiny", second)).adapters == ["b"]
        # an engine with LoRA on and no adapter yet: the agent's config says to keep reading
        adapters.clear()
        bare = EngineLoad(ready=True, model="tiny", max_model_len=2048)
        adapters.append("late")
        assert (await scrape_engine(http, url, "tiny", bare)).adapters == []  # not asked
        assert (await scrape_engine(http, url, "tiny", bare, lora=True)).adapters == ["late"]


def test_the_heartbeat_names_loaded_and_loadable_adapters(tmp_path: Path, model_dir: Path) -> None:
    build_adapter(tmp_path / "od", "od", model_dir)
    agent = AgentService(agent_config("--lora-dir", str(tmp_path), "--model", "tiny"))
    try:
        agent._scraped(EngineLoad(ready=True, model="tiny", adapters=["a"], max_lora=2,
                                  lora_running=["a"]))
        st = agent.pod_state()
        assert st.adapters == ["a", "od"]
        assert st.lora.loaded == ["a"] and st.lora.running == ["a"] and st.lora.max_lora == 2
    finally:
        agent._ctx.term()
