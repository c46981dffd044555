"""`infermesh up` starts the whole plan, prints where everything is, and stops all of it — also
when it is killed with SIGKILL; a port in use or a second run is refused with one clear line."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

from infermesh.libs.bus import BusAuthError, Credentials, connect
from infermesh.libs.bus.security import ClientSecurity
from infermesh.libs.process.runfile import pid_alive, read_run_file

from .helpers import infermesh_up

MODEL = "infermesh/tiny-llama"


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=2) as r:
        return int(r.status)


def _serving(url: str) -> bool:
    try:
        return _get(url) == 200
    except OSError:
        return False


async def _check_bus_auth(url: str, observer: Path) -> None:
    """No credentials: refused. The observer's (as `up` wrote them): connected."""
    with pytest.raises(BusAuthError):
        await asyncio.wait_for(connect(url, "anonymous"), 20)
    c = Credentials.read(observer)
    nc = await connect(url, "observer", security=ClientSecurity(c.user, c.password))
    assert nc.is_connected
    await nc.close()


def _printed(text: str, label: str) -> str:
    """The rest of the summary line that starts with ``label``."""
    for line in text.splitlines():
        if line.strip().startswith(label):
            return line.strip()[len(label):].strip()
    raise AssertionError(f"no {label!r} line in:\n{text}")


def _up(args: list[str], tmp_path: Path, model_dir: Path, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "INFERMESH_MODEL_DIR": str(model_dir)}
    return subprocess.run([sys.executable, "-m", "infermesh.cli", "up", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, check=False)


def test_up_starts_everything_and_stops_on_sigterm(tmp_path: Path, model_dir: Path) -> None:
    tmp = tmp_path / "tmp"  # the run's TMPDIR: it must leave nothing there
    tmp.mkdir()
    with infermesh_up(tmp_path, model_dir, ["--engines", "2"],
                      env={"TMPDIR": str(tmp)}) as (proc, log, run):
        text = log.read_text()
        nats_url = run.nats_url
        assert nats_url in text
        engines = [_printed(text, f"engine sim-{i}").split()[0] for i in range(2)]
        for url in engines:
            assert _get(url + "/health") == 200
        # Every service's ops port is printed, and answers.
        for name in ("agent-sim-0", "agent-sim-1", "tokenizer-0", "indexer-0", "scheduler-0"):
            metrics = _printed(text, name).split()[0]
            assert _get(metrics) == 200
            assert _get(metrics.replace("/metrics", "/health")) == 200
        # The bus has users (docs/security.md): anonymous clients are refused.
        observer = Path(run.observer_credentials)
        assert stat.S_IMODE(observer.stat().st_mode) == 0o600
        asyncio.run(_check_bus_auth(nats_url, observer))
        # The bus-watching command works exactly as printed.
        tail = shlex.split(_printed(text, "watch the bus"))
        out = subprocess.run([*tail, "--count", "1", "--timeout", "30"], capture_output=True,
                             timeout=60, check=False)
        assert out.returncode == 0 and b'"subject":"im.' in out.stdout, out.stderr[-2000:]
        # The OpenAI SDK through the ingress: a completion and a streamed chat completion.
        api = _printed(text, "OpenAI API").split()[0]
        assert api == run.ingress_url + "/v1"
        client = openai.OpenAI(base_url=api, api_key="unused")
        c = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
        assert c.usage.completion_tokens == 3
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 4
        # The fleet console is printed, serves its page, and shows both pods and the requests.
        console = _printed(text, "console").split()[0]
        assert _get(console) == 200

        def console_state() -> dict[str, Any]:
            with urllib.request.urlopen(console + "/state", timeout=2) as r:
                return json.loads(r.read())  # type: ignore[no-any-return]

        deadline = time.monotonic() + 10
        while console_state()["totals"]["finished"] < 2:
            assert time.monotonic() < deadline, console_state()["totals"]
            time.sleep(0.1)
        assert {p["pod"] for p in console_state()["pods"]} == {"sim-0", "sim-1"}
        pids = [p.pid for p in run.processes]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "infermesh stopped" in text
        assert '"level": "warning"' not in text, text[-3000:]  # a clean stop warns of nothing
    # Nothing it started is left behind: processes, run.json, credentials, temp folders.
    assert not [p for p in pids if pid_alive(p)]
    assert not any(_serving(url + "/health") for url in engines)
    assert read_run_file(tmp_path / "state") is None
    assert not observer.exists()
    assert not list(tmp.iterdir())


def test_kill_9_of_up_leaves_nothing_and_up_starts_again(tmp_path: Path,
                                                        model_dir: Path) -> None:
    with infermesh_up(tmp_path, model_dir, ["--engines", "2"]) as (proc, log, run):
        os.kill(proc.pid, signal.SIGKILL)  # the launcher alone: no clean-up code runs
        proc.wait(10)
        deadline = time.monotonic() + 30
        while any(pid_alive(p.pid) for p in run.processes):
            assert time.monotonic() < deadline, [p.name for p in run.processes
                                                 if pid_alive(p.pid)]
            time.sleep(0.1)
    # The next run finds the dead one's run.json, says so, and starts on the same ports' kind.
    with infermesh_up(tmp_path, model_dir, ["--engines", "2"], log_name="up2.log") as (
            proc2, log2, run2):
        assert f"the run of pid {proc.pid}" in log2.read_text()
        assert _get(run2.ingress_url + "/health") == 200
        proc2.send_signal(signal.SIGTERM)
        assert proc2.wait(30) == 0


def test_a_second_up_on_the_same_state_is_refused(tmp_path: Path, model_dir: Path) -> None:
    with infermesh_up(tmp_path, model_dir, ["--engines", "1"]) as (proc, _log, run):
        second = _up(["--engines", "1", "--free-ports", "--state-dir", str(tmp_path / "state")],
                     tmp_path, model_dir)
        assert second.returncode == 1
        assert f"already running (pid {proc.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert _get(run.ingress_url + "/health") == 200  # the first one is untouched


def test_a_busy_port_is_one_clear_line(tmp_path: Path, model_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        out = _up(["--engines", "1", "--nats-port", str(busy), "--state-dir",
                   str(tmp_path / "state")], tmp_path, model_dir)
    assert out.returncode == 1, out.stderr
    assert f"port {busy}" in out.stderr and "--nats-port" in out.stderr
    assert "Traceback" not in out.stderr
    assert read_run_file(tmp_path / "state") is None


def test_bad_settings_exit_2_before_anything_starts(tmp_path: Path, model_dir: Path) -> None:
    state = tmp_path / "state"
    cases = {
        ("--engines", "0"): "engines must be at least 1",
        ("--engine", "vllm", "--block-size", "48", "--vllm-command", "/bin/true"):
            "multiple of 32",
        ("--set", "ingress.max_attempts=0"): "max_attempts",
        ("--set", "nosuch.x=1"): "no service nosuch",
        ("--set", "scheduler.nosuch=1"): "no setting nosuch",
    }
    for args, message in cases.items():
        out = _up([*args, "--state-dir", str(state)], tmp_path, model_dir)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
        assert not state.exists()


def test_up_help_shows_the_defaults() -> None:
    out = subprocess.run([sys.executable, "-m", "infermesh.cli", "up", "--help"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert "(default: 4)" in out.stdout  # engines
    assert "(default: 8100)" in out.stdout  # engine_port


def test_up_with_api_keys_and_https(tmp_path: Path, model_dir: Path) -> None:
    """`up --api-keys-file --ingress-tls-cert/key`: the API wants a key and speaks HTTPS."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_pem, key_pem, ca_pem = (tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem")
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    ca.cert_pem.write_to_path(str(ca_pem))
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - name: team-a\n    key: sk-team-a-123\n")
    with infermesh_up(tmp_path, model_dir, [
            "--engines", "1", "--api-keys-file", str(keys),
            "--ingress-tls-cert", str(cert_pem), "--ingress-tls-key", str(key_pem),
    ]) as (proc, log, run):
        base = run.ingress_url + "/v1"
        assert base.startswith("https://") and base in log.read_text()
        ctx = ssl.create_default_context(cafile=str(ca_pem))
        with openai.DefaultHttpxClient(verify=ctx) as http:
            good = openai.OpenAI(base_url=base, api_key="sk-team-a-123", http_client=http)
            c = good.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
            assert c.usage.completion_tokens == 2
            bad = openai.OpenAI(base_url=base, api_key="sk-wrong", http_client=http,
                                max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                bad.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]

