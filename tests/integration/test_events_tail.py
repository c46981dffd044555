"""`infermesh events tail` on a real nats-server: decoded JSON lines, errors reported inline."""

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
from pathlib import Path

import msgspec
import nats
import pytest

from infermesh.libs.bus import NatsServer, settle
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


async def publish(url: str, messages: list[tuple[str, bytes]]) -> None:
    nc = await nats.connect(url)
    try:
        for subject, data in messages:
            await nc.publish(subject, data)
        await settle(nc)
    finally:
        await nc.close()


@pytest.fixture
def tail_proc(nats_server: NatsServer) -> Iterator[subprocess.Popen[bytes]]:
    if not INFERMESH.exists():
        pytest.skip("infermesh console script not installed next to this interpreter")
    proc = subprocess.Popen(
        [str(INFERMESH), "events", "tail", "im.pod.>", "--nats-url", nats_server.url,
         "--count", "3", "--timeout", "20"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


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
