"""`infermesh nats-auth` (the NATS users of a Kubernetes install) on a real nats-server.

The official NATS chart renders ``config.merge`` into its nats.conf as JSON; the server here runs
exactly that JSON, so what is checked is what a cluster would run: every identity logs in with
the password of the Secret, an agent publishes for any pod of its own pool and for no other
pool, and the autoscaler holds its JetStream lease under its own user.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml

from infermesh.libs.bus import ClientSecurity, NatsServer, settle
from infermesh.libs.bus.lease import Lease
from infermesh.libs.bus.security import inbox_prefix
from infermesh.proto.subjects import Subjects

from .helpers import wait_until


def _run_tool(out: Path, *extra: str) -> tuple[dict[str, str], dict[str, Any]]:
    subprocess.run([sys.executable, "-m", "infermesh.cli", "nats-auth", "--pools",
                    "default,gpu", "--out", str(out), *extra], check=True, capture_output=True)
    secret = yaml.safe_load((out / "infermesh-nats.yaml").read_text())
    values = yaml.safe_load((out / "nats-values.yaml").read_text())
    return secret["stringData"], values


@pytest.fixture
def k8s_nats(tmp_path: Path):
    passwords, values = _run_tool(tmp_path / "auth")
    assert values["config"]["jetstream"]["enabled"] is True
    conf = tmp_path / "nats.conf"
    conf.write_text(json.dumps(values["config"]["merge"], indent=2))  # as the chart renders it
    srv = NatsServer(config_file=str(conf)).start()
    yield srv, passwords
    srv.stop()


async def _client(url: str, user: str, password: str, errors: list[Exception]) -> Any:
    async def on_error(e: Exception) -> None:
        errors.append(e)

    return await nats.connect(url, user=user, password=password, error_cb=on_error,
                              inbox_prefix=inbox_prefix(user), allow_reconnect=False)


async def test_every_identity_logs_in_and_agents_publish_only_for_their_pool(k8s_nats) -> None:
    srv, passwords = k8s_nats
    assert {"ingress", "tokenizer", "scheduler", "indexer", "autoscaler", "console", "observer",
            "agent-default", "agent-gpu"} <= set(passwords)
    for user, password in passwords.items():
        nc = await _client(srv.url, user, password, [])
        await nc.close()
    with pytest.raises(Exception, match="[Aa]uthorization"):
        await _client(srv.url, "agent-default", "wrong", [])

    got: list[str] = []
    witness = await _client(srv.url, "indexer", passwords["indexer"], [])

    async def on_msg(msg: Any) -> None:
        got.append(msg.subject)

    await witness.subscribe("im.kv.*.*", cb=on_msg)
    await settle(witness)
    errors: list[Exception] = []
    agent = await _client(srv.url, "agent-default", passwords["agent-default"], errors)
    try:
        s = Subjects("im")
        # Pod names are not known ahead: any pod of its pool goes, no pod of another.
        for pod in ("engine-6d4b9c7f5-x2x9z", "engine-6d4b9c7f5-k8j2p"):
            await agent.publish(s.kv("default", pod), b"batch")
            await agent.publish(s.pod_state("default", pod), b"heartbeat")
        await agent.publish(s.kv("gpu", "engine-1"), b"forged")
        await settle(agent)
        await wait_until(lambda: any("im.kv.gpu.engine-1" in str(e) for e in errors),
                         what="the publish for another pool refused")
        await wait_until(lambda: len(got) == 2, what="its own pool's batches delivered")
        assert set(got) == {"im.kv.default.engine-6d4b9c7f5-x2x9z",
                            "im.kv.default.engine-6d4b9c7f5-k8j2p"}
        assert agent.is_connected
    finally:
        await agent.close()
        await witness.close()


async def test_the_autoscaler_holds_its_lease_under_its_own_user(k8s_nats) -> None:
    srv, passwords = k8s_nats
    sec = ClientSecurity("autoscaler", passwords["autoscaler"])
    nc = await nats.connect(srv.url, allow_reconnect=False, **sec.connect_options())
    try:
        lease = Lease(nc, Subjects("im").autoscaler_lease_bucket, "leader", "autoscaler-0",
                      ttl_s=2.0)
        assert await lease.step(time.monotonic())
        await lease.release()
    finally:
        await nc.close()
    log = srv.tail(100_000)
    assert "Violation" not in log, log


def test_running_it_again_keeps_the_passwords(tmp_path: Path) -> None:
    first, _ = _run_tool(tmp_path)
    again, values = _run_tool(tmp_path)
    assert first == again
    users = {u["user"] for u in values["config"]["merge"]["authorization"]["users"]}
    assert users == set(first)
    assert all(u["password"].startswith("$2") for u in
               values["config"]["merge"]["authorization"]["users"]), "hashes only"
    assert (tmp_path / "infermesh-nats.yaml").stat().st_mode & 0o077 == 0


def test_bad_pools_are_refused(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "infermesh.cli", "nats-auth", "--pools", "a.b",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "pool" in r.stderr
