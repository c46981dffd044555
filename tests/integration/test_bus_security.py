"""NATS users, per-service permissions and TLS on a real nats-server (libs/bus/security.py).

The server runs the config `write_bus_auth` generates. Refused actions are checked from both
sides: the client's error callback gets the server's permissions violation, and a subscriber
with the right to read the subject never sees the message.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import openai
import pytest
from nats.aio.client import Client

from infermesh.libs.bus import (
    BUS_REGISTRY,
    BusAuth,
    BusAuthError,
    BusError,
    ClientSecurity,
    NatsServer,
    ServerTLS,
    connect,
    request,
    settle,
    write_bus_auth,
)
from infermesh.proto import codec
from infermesh.proto.messages import (
    BlockStored,
    KVEventBatch,
    LookupReply,
    LookupRequest,
    TokenizeReply,
    TokenizeRequest,
)

from ..stack import start_stack
from .helpers import SIM_BLOCK_SIZE, wait_until

PODS = [("default", "sim-0"), ("default", "sim-1")]
MODEL = "infermesh/tiny-llama"
BS = SIM_BLOCK_SIZE


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[NatsServer, BusAuth]]:
    """A nats-server running the generated users and permissions for PODS."""
    auth = write_bus_auth(tmp_path, "im", PODS, max_payload=8 * 1024 * 1024)
    srv = NatsServer(config_file=str(auth.config_file)).start()
    yield srv, auth
    srv.stop()


async def _client(url: str, security: ClientSecurity, errors: list[Exception]) -> Client:
    """A plain nats-py client that records every error the server reports to it."""

    async def on_error(e: Exception) -> None:
        errors.append(e)

    return await nats.connect(url, error_cb=on_error, allow_reconnect=False,
                              **security.connect_options())


def _kv_batch(pod: str, note: str) -> bytes:
    return codec.encode(KVEventBatch(
        pod=pod, pool="default", epoch=note, seq=1, ts=time.time(),
        events=[BlockStored(block_hashes=[1, 2], token_ids=list(range(2 * BS)), block_size=BS)],
    ))


def _violations(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if re.search(r"violation|bus_permission_denied|bus_refused", line, re.I)]


# ------------------------------------------------------------------------------- authentication


async def test_unauthenticated_and_wrong_password_are_refused(secured) -> None:
    srv, auth = secured
    good = auth.client("indexer")
    cases = {
        "no credentials": None,
        "wrong password": ClientSecurity("indexer", "not-the-password"),
        "unknown user": ClientSecurity("admin", good.password),
        "another user's password": ClientSecurity("scheduler", good.password),
    }
    for what, sec in cases.items():
        t0 = time.monotonic()
        # Refused at once, not retried: the wait_for only turns a hang into a clear failure.
        with pytest.raises(BusAuthError, match="Authorization Violation"):
            await asyncio.wait_for(connect(srv.url, "intruder", security=sec), 20)
        print(f"{what}: refused in {(time.monotonic() - t0) * 1000:.1f} ms")
    assert "authentication error" in srv.tail(20_000)
    nc = await connect(srv.url, "indexer", security=good)
    assert nc.is_connected
    await nc.close()


# ---------------------------------------------------------------------------------- permissions

# (identity, subject it must not publish on)
FORGED_PUBLISH = [
    ("agent-sim-1", "im.kv.default.sim-0"),   # another pod's KV events
    ("agent-sim-1", "im.pod.default.sim-0"),  # another pod's heartbeat
    ("agent-sim-1", "im.kv.other.sim-1"),     # its own pod name in another pool
    ("ingress", "im.kv.default.sim-0"),
    ("ingress", "im.kv.default.sim-1"),
    ("scheduler", "im.kv.default.sim-0"),
    ("tokenizer", "im.kv.default.sim-1"),
    ("indexer", "im.kv.default.sim-0"),
    ("observer", "im.kv.default.sim-0"),
]
# (identity, subject it must not subscribe to)
FORGED_SUBSCRIBE = [
    ("agent-sim-1", "im.snapshot.sim-0"),  # would let it answer snapshots for sim-0
    ("ingress", "_INBOX.scheduler.>"),         # another identity's replies
    ("tokenizer", "im.kv.*.*"),
    ("observer", "_INBOX.>"),
]


async def test_forged_kv_events_are_refused_and_never_delivered(secured) -> None:
    srv, auth = secured
    witness_errors: list[Exception] = []
    witness = await _client(srv.url, auth.client("indexer"), witness_errors)
    got: list[tuple[str, bytes]] = []

    async def on_msg(msg: Any) -> None:
        got.append((msg.subject, msg.data))

    await witness.subscribe("im.kv.*.*", cb=on_msg)
    await witness.subscribe("im.pod.*.*", cb=on_msg)
    await settle(witness)
    clients: dict[str, tuple[Client, list[Exception]]] = {}
    try:
        for user in sorted({u for u, _ in FORGED_PUBLISH + FORGED_SUBSCRIBE}):
            errs: list[Exception] = []
            clients[user] = (await _client(srv.url, auth.client(user), errs), errs)
        forged: set[bytes] = set()
        for user, subject in FORGED_PUBLISH:
            nc, errs = clients[user]
            data = _kv_batch("sim-0", f"forged-by-{user}-on-{subject}")
            forged.add(data)
            await nc.publish(subject, data)
            await settle(nc)
            # The server refuses it and says so to the forger.
            await wait_until(lambda e=errs, s=subject: any(
                f'permissions violation for publish to "{s}"' in str(x) for x in e),
                what=f"{user} told its publish on {subject} was refused")
            assert nc.is_connected  # refused, not disconnected
        for user, subject in FORGED_SUBSCRIBE:
            nc, errs = clients[user]
            await nc.subscribe(subject)
            await settle(nc)
            await wait_until(lambda e=errs, s=subject: any(
                f'permissions violation for subscription to "{s.lower()}"' in str(x).lower()
                for x in e), what=f"{user} told its subscription to {subject} was refused")
        # The legitimate events of both agents arrive; the forged ones never do (a refused
        # message is dropped by the server when it refuses it, so it cannot arrive later).
        legit0, legit1 = _kv_batch("sim-0", "legit-0"), _kv_batch("sim-1", "legit-1")
        legit = {legit0: "im.kv.default.sim-0", legit1: "im.kv.default.sim-1"}
        agent0 = await connect(srv.url, "agent-sim-0", security=auth.client("agent-sim-0"))
        try:
            await agent0.publish("im.kv.default.sim-0", legit0)
            await settle(agent0)
        finally:
            await agent0.close()
        nc1, _ = clients["agent-sim-1"]
        await nc1.publish("im.kv.default.sim-1", legit1)
        await nc1.publish("im.pod.default.sim-1", b"heartbeat")
        await settle(nc1)
        await wait_until(lambda: {d for _, d in got} >= set(legit), what="legit events")
        await wait_until(lambda: (("im.pod.default.sim-1", b"heartbeat") in got),
                         what="legit heartbeat")
        assert not forged & {d for _, d in got}, "a forged event was delivered"
        assert {s for s, d in got if d in legit} == set(legit.values())
        assert not witness_errors
        log = srv.tail(100_000)
        for user, subject in FORGED_PUBLISH:
            assert f'"$G/user:{user}" - Publish Violation - Subject "{subject}"' in log, \
                (user, subject)
        print(f"forged publishes refused: {len(FORGED_PUBLISH)}, forged subscriptions refused: "
              f"{len(FORGED_SUBSCRIBE)}, delivered to the indexer identity: {len(got)} "
              f"(all legitimate)")
    finally:
        for nc, _ in clients.values():
            await nc.close()
        await witness.close()


async def test_replies_go_only_to_the_requester(secured) -> None:
    """A responder answers through allow_responses; its reply reaches only the asker's inbox."""
    srv, auth = secured
    tok_errs: list[Exception] = []
    tok = await _client(srv.url, auth.client("tokenizer"), tok_errs)

    async def answer(msg: Any) -> None:
        await msg.respond(b"ok:" + msg.data)
        # A second reply is over the tokenizer's allowance of one per request.
        await msg.respond(b"again")

    await tok.subscribe("im.tokenize", "tokenizer", cb=answer)
    await settle(tok)
    ing = await connect(srv.url, "ingress", security=auth.client("ingress"))
    try:
        r = await ing.request("im.tokenize", b"hi", timeout=5)
        assert r.data == b"ok:hi" and r.subject.startswith("_INBOX.ingress.")
        await wait_until(lambda: any("permissions violation for publish" in str(e)
                                     for e in tok_errs), what="second reply refused")
        # The tokenizer cannot publish a "reply" to an inbox that asked it nothing.
        await tok.publish("_INBOX.ingress.x.y", b"unasked")
        await settle(tok)
        await wait_until(lambda: sum("_INBOX.ingress.x.y" in str(e).upper() or
                                     "_inbox.ingress.x.y" in str(e) for e in tok_errs) >= 1,
                         what="unasked reply refused")
    finally:
        await ing.close()
        await tok.close()


async def test_events_tail_with_the_observer_credentials(secured) -> None:
    srv, auth = secured
    cmd = [sys.executable, "-m", "infermesh.cli", "events", "tail", "im.pod.>", "--count", "1",
           "--timeout", "60", "--nats-url", srv.url,
           "--nats-credentials", str(auth.credentials_file("observer"))]
    tail = asyncio.create_task(asyncio.to_thread(
        subprocess.run, cmd, capture_output=True, timeout=90, check=False))
    agent = await connect(srv.url, "agent-sim-0", security=auth.client("agent-sim-0"))
    try:
        while not tail.done():  # heartbeats until the tail has printed one
            await agent.publish("im.pod.default.sim-0", b"\x80")
            await asyncio.sleep(0.1)
        out = tail.result()
    finally:
        await agent.close()
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[0])["subject"] == "im.pod.default.sim-0"
    assert not _violations(out.stderr.decode())
    # Without credentials the tail is refused at once, with a clear error.
    bare = await asyncio.to_thread(subprocess.run, cmd[:-2], capture_output=True, timeout=90,
                                   check=False)
    assert bare.returncode != 0 and b"Authorization Violation" in bare.stderr


# ------------------------------------------------------------------------------- the real stack


async def test_the_whole_stack_runs_under_its_identities(secured, procs) -> None:
    srv, auth = secured
    t0 = time.monotonic()
    # The autoscaler and the console run under their identities too (the autoscaler held at
    # two engines: the routing checks below need both).
    stack = start_stack(procs, srv, engines=2, auth=auth, autoscale=True, console=True,
                        settings={"autoscaler": {"interval_s": 0.2, "warmup_s": 0.2,
                                                 "min_replicas": 2, "max_replicas": 2}})
    print(f"stack up under auth in {time.monotonic() - t0:.1f} s")
    client = openai.AsyncOpenAI(base_url=stack.ingress_url + "/v1", api_key="unused")
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert raw.headers["x-infermesh-endpoint"] in stack.pods
    assert raw.parse().usage.completion_tokens == 3

    # Prefix routing needs every bus path: tokenize (ingress), KV events (agents → indexer),
    # lookups (scheduler → indexer), request events (ingress → scheduler).
    rng = random.Random(7)
    vocab = "alpha beta gamma delta river stone cloud light north quiet engine market".split()
    prefix = " ".join(rng.choice(vocab) for _ in range(500))
    ing = await connect(srv.url, "test-ingress", security=auth.client("ingress"))
    sch = await connect(srv.url, "test-scheduler", security=auth.client("scheduler"))
    sent = failed = 0
    try:
        async with aiohttp.ClientSession() as http:

            async def post(prompt: str) -> str:
                nonlocal sent, failed
                sent += 1
                async with http.post(stack.ingress_url + "/v1/completions",
                                     json={"model": MODEL, "prompt": prompt,
                                           "max_tokens": 2}) as r:
                    if r.status != 200:
                        failed += 1
                    assert r.status == 200, await r.text()
                    return r.headers["x-infermesh-endpoint"]

            first = await post(prefix + " first")
            # Token ids asked: the full answer (the tokenizer service may not have seen this text,
            # which the ingress tokenized itself, and would answer early).
            keys = (await request(ing, "im.tokenize", TokenizeRequest(
                model=MODEL, block_size=BS, prompt=prefix, return_token_ids=True),
                TokenizeReply, timeout=5)).block_keys
            assert len(keys) > 10

            async def indexed() -> bool:
                try:
                    r = await request(sch, "im.index.lookup",
                                      LookupRequest(model=MODEL, block_keys=keys), LookupReply,
                                      timeout=5)
                except BusError:  # no indexer (yet)
                    return False
                return any(m.pod == first and m.blocks >= len(keys) - 1 for m in r.matches)

            await wait_until(indexed, what="prefix indexed")
            hits = Counter([await post(prefix + f" follow-up {i}") for i in range(4)])
            assert hits == {first: 4}, hits

            # A fresh indexer learns the old blocks only from agent snapshots (multi-part
            # replies): it must be allowed to ask, and the agents to answer.
            stack.indexers[0].stop()
            t1 = time.monotonic()
            stack.indexers.append(procs.service(
                "indexer", "--nats-url", srv.url, "--http-port", "-1",
                "--nats-credentials", str(auth.credentials_file("indexer")), name="indexer-b"))
            await wait_until(indexed, timeout=60, what="prefix re-indexed from a snapshot")
            print(f"new indexer rebuilt from snapshots in {time.monotonic() - t1:.1f} s")
            assert await post(prefix + " after") == first
    finally:
        await ing.close()
        await sch.close()
    print(f"requests sent {sent}, failed {failed}")
    assert failed == 0

    # The autoscaler heard the heartbeats and request events and published its decisions.
    health_url = stack.system.plan.of_kind("autoscaler")[0].health_url
    async with aiohttp.ClientSession() as http:
        async with http.get(health_url) as r:
            pools = (await r.json())["pools"]
        assert pools["default"]["ready"] == 2, pools
        # The console read heartbeats, request events and decisions under its own user.
        (console,) = stack.system.plan.of_kind("console")
        async with http.get(console.links["console"] + "/state") as r:
            seen = await r.json()
    assert {p["pod"] for p in seen["pods"]} == set(stack.pods)
    assert seen["totals"]["routed"] >= 5 and "default" in seen["autoscaler"], seen["totals"]

    # No legitimate action was refused anywhere: the permission lists are complete.
    logs = {p.log.name: p.tail(10**7) for p in procs.procs if p.log}
    logs["nats-server"] = srv.tail(10**7)
    bad = {name: _violations(text) for name, text in logs.items() if _violations(text)}
    assert not bad, json.dumps(bad, indent=1)[:4000]
    assert "snapshot_applied" in logs[stack.indexers[-1].log.name]  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------- TLS


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, str]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    out = {"ca": str(tmp_path / "ca.pem"), "cert": str(tmp_path / "server.pem"),
           "key": str(tmp_path / "server.key"), "client_cert": str(tmp_path / "client.pem"),
           "client_key": str(tmp_path / "client.key")}
    ca.cert_pem.write_to_path(out["ca"])
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.private_key_and_cert_chain_pem.write_to_path(out["cert"])
    server.private_key_pem.write_to_path(out["key"])
    client = ca.issue_cert("infermesh-client")
    client.private_key_and_cert_chain_pem.write_to_path(out["client_cert"])
    client.private_key_pem.write_to_path(out["client_key"])
    return out


def _plaintext_reply(host: str, port: int) -> bytes:
    """What a client that does not speak TLS gets after CONNECT + PING."""
    with socket.create_connection((host, port), timeout=5) as s:
        info = s.recv(4096)
        assert b'"tls_required":true' in info, info
        s.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except OSError:
            pass
        return out


async def test_nats_tls(tmp_path: Path, certs: dict[str, str], procs) -> None:
    tls = ServerTLS(certs["cert"], certs["key"])
    auth = write_bus_auth(tmp_path / "tls", "im", PODS, tls=tls, tls_ca=certs["ca"])
    assert "tls {" in auth.config_file.read_text()
    with NatsServer(config_file=str(auth.config_file)) as srv:
        # With the CA: connected over TLS, as its identity.
        nc = await connect(srv.url, "observer", security=auth.client("observer"))
        assert nc.is_connected
        await nc.close()
        # Without the CA (system roots only): the server's certificate does not verify.
        obs = auth.client("observer")
        no_ca = ClientSecurity(obs.user, obs.password)
        with pytest.raises(BusAuthError, match="CERTIFICATE_VERIFY_FAILED|certificate verify"):
            await asyncio.wait_for(connect(srv.url, "no-ca", security=no_ca), 20)
        # Without TLS at all: no PONG, the server wants TLS first.
        assert b"PONG" not in await asyncio.to_thread(_plaintext_reply, srv.host, srv.port)
        # A service process connects with the CA knob and its credentials, and answers.
        procs.service("tokenizer", "--nats-url", srv.url, "--http-port", "-1",
                      "--nats-credentials", str(auth.credentials_file("tokenizer")),
                      "--nats-tls-ca", certs["ca"])
        ing = await connect(srv.url, "ingress", security=auth.client("ingress"))
        try:
            async def answers() -> bool:
                try:
                    r = await request(ing, "im.tokenize", TokenizeRequest(
                        model=MODEL, block_size=BS, prompt="hello over tls"), TokenizeReply,
                        timeout=2)
                except Exception:
                    return False
                return r.num_tokens > 0

            await wait_until(answers, timeout=60, interval=0.2, what="tokenizer over TLS")
        finally:
            await ing.close()
        assert not _violations(srv.tail(10**6))


async def test_nats_mutual_tls(tmp_path: Path, certs: dict[str, str]) -> None:
    from infermesh.libs.bus.security import server_config

    conf = tmp_path / "mtls.conf"
    conf.write_text(server_config(None, tls=ServerTLS(certs["cert"], certs["key"],
                                                      ca_file=certs["ca"], verify=True)))
    with NatsServer(config_file=str(conf)) as srv:
        with_cert = ClientSecurity(tls_ca=certs["ca"], tls_cert=certs["client_cert"],
                                   tls_key=certs["client_key"])
        nc = await connect(srv.url, "with-cert", security=with_cert)
        assert nc.is_connected
        await nc.close()
        # No client certificate: the server rejects the handshake, and the client gives up.
        with pytest.raises(BusAuthError, match="(?i)certificate.required"):
            await asyncio.wait_for(connect(srv.url, "no-cert",
                                           security=ClientSecurity(tls_ca=certs["ca"])), 20)


async def test_a_refused_publish_is_counted_for_metrics(secured) -> None:
    srv, auth = secured
    nc = await connect(srv.url, "ingress-counted", security=auth.client("ingress"))
    try:
        await nc.publish("im.kv.default.sim-0", b"forged")
        await settle(nc)

        def denied() -> float:
            return BUS_REGISTRY.get_sample_value(
                "infermesh_bus_errors_total",
                {"client": "ingress-counted", "kind": "permission_denied"}) or 0.0

        await wait_until(lambda: denied() == 1, what="permission_denied counted")
        assert nc.is_connected
    finally:
        await nc.close()
