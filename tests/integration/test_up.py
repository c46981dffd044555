"""`infermesh up` starts nats-server, the engines and their agents, and stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai

from .helpers import free_ports


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=2) as r:
        return int(r.status)


def test_up_starts_everything_and_stops_on_sigterm(tmp_path: Path, model_dir: Path) -> None:
    engines = 2
    nats, sim, kv = free_ports(1), free_ports(engines), free_ports(2 * engines)
    ingress = free_ports(1)
    log = tmp_path / "up.log"
    env = {**os.environ, "INFERMESH_MODEL_DIR": str(model_dir)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "infermesh.cli", "up", "--engines", str(engines),
             "--nats-port", str(nats), "--sim-port", str(sim), "--kv-port", str(kv),
             "--ingress-port", str(ingress),
             "--state-dir", str(tmp_path / "state")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "infermesh is up" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        text = log.read_text()
        assert f"nats://127.0.0.1:{nats}" in text
        for i in range(engines):
            assert f"http://127.0.0.1:{sim + i}" in text
            assert _get(f"http://127.0.0.1:{sim + i}/health") == 200
        # The OpenAI SDK through the ingress: a completion and a streamed chat completion.
        assert f"http://127.0.0.1:{ingress}/v1" in text
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ingress}/v1", api_key="unused")
        c = client.completions.create(model="infermesh/tiny-llama", prompt="Hi", max_tokens=3)
        assert c.usage.completion_tokens == 3
        chunks = list(client.chat.completions.create(
            model="infermesh/tiny-llama", messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        assert "infermesh stopped" in log.read_text()
        # Nothing it started is left behind.
        for port in (sim, sim + 1):
            try:
                _get(f"http://127.0.0.1:{port}/health")
                raise AssertionError(f"engine on {port} still serving")
            except OSError:
                pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
