"""`infermesh events tail` on a real nats-server: decoded JSON lines, errors reported inline; on a
bus with users, its defaults from the run file of `infermesh up`, and a subject the identity may
not read refused at once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats
import pytest

from infermesh.libs.bus import BusAuth, ClientSecurity, NatsServer, connect, settle, write_bus_auth
from infermesh.libs.process.runfile import RunFile, write_run_file
from infermesh.proto import codec
from infermesh.proto.messages import LoraInfo, PodState

INFERMESH = Path(sys.executable).parent / "infermesh"
GARBAGE = b"\xc1 this is not msgpack"  # 0xc1 is never used in MessagePack


def pod_state(pod: str, kv_usage: float, running: int) -> PodState:
    return PodState(pod=pod, pool="default", model="tiny", url="http://127.0.0.1:8100",
                    ts=1700000000.5, epoch="ep-1", kv_seq=3, running=running, waiting=1,
                    kv_usage=kv_usage, block_size=16, num_gpu_blocks=1000,
                    lora=LoraInfo(running=["a"], max_lora=2), labels={"zone": "z1"})


def subscribed(monitor_port: int, subject: str) -> bool:
    """Whether some client of the server holds a subscription on ``subject``."""
    url = f"http://127.0.0.1:{monitor_port}/connz?subs=1"
    with urllib.request.urlopen(url, timeout=2) as r:
        connz = json.load(r)
    return any(subject in (c.get("subscriptions_list") or []) for c in connz["connections"])


def wait_subscribed(proc: subprocess.Popen[bytes], monitor_port: int, subject: str,
                    timeout: float = 20.0) -> None:
    """Poll the monitor until the subscription shows up (or the process died)."""
    deadline = time.monotonic() + timeout
    while not subscribed(monitor_port, subject):
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"events tail exited with {proc.returncode}: {err.decode()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no subscription on {subject!r} within {timeout}s")
        time.sleep(0.01)  # poll interval, not a readiness guess


async def publish(url: str, messages: list[tuple[str, bytes]],
                  security: ClientSecurity | None = None) -> None:
    nc = await (nats.connect(url) if security is None
                else connect(url, "publisher", security=security))
    try:
        for subject, data in messages:
            await nc.publish(subject, data)
        await settle(nc)
    finally:
        await nc.close()


def tail_env(state_dir: Path) -> dict[str, str]:
    """The environment of an `events tail` whose state directory (run file or none) is
    ``state_dir``, with no INFERMESH_EVENTS_* of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERMESH_EVENTS_")}
    return {**env, "PYTHONUNBUFFERED": "1", "INFERMESH_STATE_DIR": str(state_dir)}


def start_tail(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    if not INFERMESH.exists():
        pytest.skip("infermesh console script not installed next to this interpreter")
    return subprocess.Popen([str(INFERMESH), "events", "tail", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)


def stop_tail(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)


@pytest.fixture
def tail_proc(nats_server: NatsServer, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_tail(["im.pod.>", "--nats-url", nats_server.url, "--count", "3",
                       "--timeout", "20"], tail_env(tmp_path))  # no run file there
    try:
        yield proc
    finally:
        stop_tail(proc)


@dataclass
class SecuredRun:
    """A nats-server with users, and the state directory of the `infermesh up` that runs it."""

    nats: NatsServer
    auth: BusAuth
    state_dir: Path


@pytest.fixture
def secured_run(tmp_path: Path) -> Iterator[SecuredRun]:
    state = tmp_path / "state"
    auth = write_bus_auth(state, "im", [("default", "sim-0")])
    srv = NatsServer(config_file=str(auth.config_file)).start()
    write_run_file(RunFile(pid=os.getpid(), started=time.time(), state_dir=str(state),
                           nats_url=srv.url, subject_prefix="im",
                           observer_credentials=str(auth.credentials_file("observer"))))
    try:
        yield SecuredRun(srv, auth, state)
    finally:
        srv.stop()


def test_tail_prints_decoded_messages_and_errors(
    nats_server: NatsServer, tail_proc: subprocess.Popen[bytes]
) -> None:
    wait_subscribed(tail_proc, nats_server.monitor_port, "im.pod.>")
    a, b = pod_state("sim-0", 0.25, 2), pod_state("sim-1", 0.75, 5)
    asyncio.run(publish(nats_server.url, [
        ("im.pod.default.sim-0", codec.encode(a)),
        ("im.pod.default.sim-1", codec.encode(b)),
        ("im.pod.x.y", GARBAGE),
    ]))
    out, err = tail_proc.communicate(timeout=30)
    assert tail_proc.returncode == 0, err.decode()

    lines = out.decode().splitlines()
    assert len(lines) == 3, out.decode() + err.decode()
    rows = [json.loads(line) for line in lines]  # every line is one JSON document

    for row, sent, subject in [(rows[0], a, "im.pod.default.sim-0"),
                               (rows[1], b, "im.pod.default.sim-1")]:
        assert row["subject"] == subject
        assert "error" not in row
        msg = row["msg"]
        assert msg["pod"] == sent.pod and msg["pool"] == "default"
        assert msg["kv_usage"] == sent.kv_usage and msg["running"] == sent.running
        assert msg["epoch"] == "ep-1" and msg["kv_seq"] == 3 and msg["v"] == 1
        assert msg["lora"]["running"] == ["a"] and msg["labels"] == {"zone": "z1"}
        assert msg["ready"] is True and msg["ts"] == 1700000000.5
        # The JSON line round-trips to the very message that was sent.
        assert msgspec.convert(msg, PodState) == sent

    bad = rows[2]
    assert bad["subject"] == "im.pod.x.y"
    assert "msg" not in bad
    assert isinstance(bad["error"], str) and "PodState" in bad["error"]


def test_tail_with_no_flags_follows_the_running_up(secured_run: SecuredRun) -> None:
    """README's `infermesh events tail 'im.pod.>'` on a bus with users: the run file gives the
    URL and the observer's credentials."""
    proc = start_tail(["im.pod.>", "--count", "1", "--timeout", "20"],
                      tail_env(secured_run.state_dir))
    try:
        wait_subscribed(proc, secured_run.nats.monitor_port, "im.pod.>")
        st = pod_state("sim-0", 0.5, 1)
        asyncio.run(publish(secured_run.nats.url, [("im.pod.default.sim-0", codec.encode(st))],
                            secured_run.auth.client("agent-sim-0")))
        out, err = proc.communicate(timeout=30)
    finally:
        stop_tail(proc)
    assert proc.returncode == 0, err.decode()
    (line,) = out.decode().splitlines()
    assert msgspec.convert(json.loads(line)["msg"], PodState) == st


@pytest.mark.parametrize("source", ["run file", "flags"])
def test_a_subject_the_identity_may_not_read_fails_at_once(secured_run: SecuredRun, tmp_path: Path,
                                                            source: str) -> None:
    """The observer may read `im.>` and its inbox only: `tail '>'` says so and exits, instead of
    waiting forever for messages the server will never send it."""
    if source == "run file":
        args, env = [], tail_env(secured_run.state_dir)
    else:
        creds = secured_run.auth.credentials_file("observer")
        args = ["--nats-url", secured_run.nats.url, "--nats-credentials", str(creds)]
        env = tail_env(tmp_path / "no-run")
    start = time.monotonic()
    proc = start_tail([">", "--timeout", "60", *args], env)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        stop_tail(proc)
    took = time.monotonic() - start
    assert proc.returncode not in (0, None), err.decode()
    assert out == b""
    lines = err.decode().splitlines()
    assert len(lines) == 1, lines  # one line, no traceback, no log noise
    assert "'>'" in lines[0] and "'observer'" in lines[0] and "'im.>'" in lines[0], lines[0]
    assert took < 20  # at once: not after --timeout
