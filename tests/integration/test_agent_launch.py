"""`infermesh agent --launch-vllm`: the agent starts its engine with KV events wired up,
restarts it when it dies (re-indexed from seq 0), and stops it with itself."""

from __future__ import annotations

import json
import os
import random
import stat
import sys
from pathlib import Path

import aiohttp

from infermesh.libs.bus import connect

from .helpers import BusWatcher, complete_ids, random_prompt, sim_cache, wait_until

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_agent_launches_supervises_and_stops_its_engine(nats_server, procs, tmp_path):
    fake = tmp_path / "vllm"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests' / 'fake_vllm.py'} \"$@\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    pidfile = tmp_path / "engine.pid"
    nc = await connect(nats_server.url, "test")
    watch = await BusWatcher(nc).start()
    agent = procs.service(
        "agent", "--nats-url", nats_server.url, "--pod", "own", "--http-port", "-1",
        "--launch-vllm", str(procs.model_dir), "--model", "infermesh/tiny-llama",
        "--vllm-command", str(fake), "--vllm-log", str(tmp_path / "engine.log"),
        "--", "--block-size", "16", "--max-model-len", "4096",
        name="agent-launch", env={"FAKE_VLLM_PIDFILE": str(pidfile)},
    )
    await wait_until(lambda: "own" in watch.states and watch.states["own"].ready, timeout=30,
                     what="launched engine ready")
    # While it booted the agent said once what it waits for (and where the engine's output
    # goes), warned about nothing, and said when the engine was ready.
    await wait_until(lambda: "engine_ready" in agent.tail(100_000), what="engine_ready log")
    lines = [json.loads(ln) for ln in agent.log.read_text().splitlines() if ln.startswith("{")]
    events = [ln["event"] for ln in lines]
    boot = lines[: events.index("engine_ready") + 1]
    waiting = [ln for ln in boot if ln["event"] == "waiting_for_engine"]
    assert len(waiting) == 1 and waiting[0]["vllm_log"] == str(tmp_path / "engine.log")
    assert waiting[0]["url"] == watch.states["own"].url
    assert not [ln for ln in boot if ln["level"] not in ("debug", "info")], boot
    url = watch.states["own"].url
    pid = int(pidfile.read_text())
    rng = random.Random(4)
    view = watch.view("own")
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            await complete_ids(http, url, random_prompt(rng, 48))
        first = set((await sim_cache(http, url))["GPU"])
    await wait_until(lambda: bool(first) and view.gpu == first, what="launched engine events")

    os.kill(pid, 9)  # the engine crashes; the agent starts a new one on the same ports
    await wait_until(lambda: pidfile.exists() and int(pidfile.read_text()) != pid, timeout=30,
                     what="engine restarted")
    await wait_until(lambda: watch.states["own"].ready, timeout=30, what="ready again")
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            await complete_ids(http, url, random_prompt(rng, 48))
        second = set((await sim_cache(http, url))["GPU"])
    await wait_until(lambda: view.gpu == second, what="bus view replaced by the new engine")
    assert not (second & first)

    new_pid = int(pidfile.read_text())
    agent.stop()  # SIGTERM: the agent stops its engine too
    assert not _alive(new_pid)
    await nc.close()
