"""The bus's users and permissions (libs/bus/security.py), without a server."""

from __future__ import annotations

import json
import re
import ssl
import stat
from pathlib import Path

import bcrypt
import pytest

from infermesh.libs.bus.security import (
    AGENT_MAX_RESPONSES,
    CONSOLE,
    INGRESS,
    OBSERVER,
    BusClientKnobs,
    ClientSecurity,
    Credentials,
    CredentialsError,
    Identity,
    ServerTLS,
    identities,
    inbox_prefix,
    server_config,
    write_bus_auth,
)
from infermesh.libs.config import load_config

PODS = [("default", "sim-0"), ("default", "sim-1"), ("big", "gpu-7")]


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, ``>`` the rest (one token or more)."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def allowed(patterns: tuple[str, ...], subject: str) -> bool:
    return any(matches(p, subject) for p in patterns)


def by_user(prefix: str = "im") -> dict[str, Identity]:
    return {i.user: i for i in identities(prefix, PODS)}


def test_subject_matcher_itself() -> None:
    assert matches("im.kv.*.*", "im.kv.default.sim-0")
    assert not matches("im.kv.*.*", "im.kv.default")
    assert matches("im.>", "im.kv.default.sim-0")
    assert not matches("im.>", "im")
    assert not matches("im.kv.default.sim-0", "im.kv.default.sim-1")


def test_one_identity_per_pod_and_per_service() -> None:
    users = set(by_user())
    assert users == {"agent-sim-0", "agent-sim-1", "agent-gpu-7", "tokenizer", "indexer",
                     "scheduler", "ingress", "autoscaler", "console", "observer"}


def test_autoscaler_rights() -> None:
    a = by_user()["autoscaler"].permissions
    # Decisions, and the lease bucket's JetStream API and keys; nothing else of JetStream.
    assert set(a.publish) == {
        "im.scale.*", "$JS.API.STREAM.INFO.KV_im_autoscaler",
        "$JS.API.STREAM.CREATE.KV_im_autoscaler", "$JS.API.STREAM.MSG.GET.KV_im_autoscaler",
        "$JS.API.DIRECT.GET.KV_im_autoscaler.>", "$KV.im_autoscaler.>"}
    assert not any(matches(p, "$JS.API.STREAM.DELETE.KV_im_autoscaler") or
                   matches(p, "$KV.other.leader") for p in a.publish)
    assert set(a.subscribe) == {"im.pod.*.*", "im.req.*", "im.scale.*", "_INBOX.autoscaler.>"}
    assert a.responses == 0


def test_the_console_only_reads_what_it_shows() -> None:
    c = by_user()[CONSOLE].permissions
    assert set(c.subscribe) == {"im.pod.*.*", "im.req.*", "im.scale.*"}
    assert c.publish == () and c.responses == 0
    for subject in ("im.kv.default.sim-0", "im.tokenize", "im.snapshot.sim-0", "_INBOX.x.y"):
        assert not allowed(c.subscribe, subject), subject
    text = server_config({i.user: "pw" for i in identities("im", PODS)},
                         identities("im", PODS))
    assert ('{user: "console", password: "pw",\n     permissions: {publish: {deny: [">"]}, '
            'subscribe: {allow: ["im.pod.*.*", "im.req.*", "im.scale.*"]}}}') in text


def test_an_agent_publishes_only_its_own_pods_subjects() -> None:
    ids = by_user()
    a = ids["agent-sim-1"].permissions
    assert set(a.publish) == {"im.kv.default.sim-1", "im.pod.default.sim-1"}
    for forged in ("im.kv.default.sim-0", "im.pod.default.sim-0", "im.kv.big.gpu-7",
                   "im.kv.other.sim-1", "im.req.default", "im.tokenize", "_INBOX.x.y"):
        assert not allowed(a.publish, forged), forged
    # It answers snapshot requests for its own pod only, one message per part.
    assert allowed(a.subscribe, "im.snapshot.sim-1")
    assert not allowed(a.subscribe, "im.snapshot.sim-0")
    assert not allowed(a.subscribe, "im.kv.default.sim-0")
    assert a.responses == AGENT_MAX_RESPONSES
    # The pool is part of the identity: gpu-7 publishes in pool "big".
    assert set(ids["agent-gpu-7"].permissions.publish) == {"im.kv.big.gpu-7",
                                                           "im.pod.big.gpu-7"}


def test_only_agents_may_publish_kv_events() -> None:
    for user, ident in by_user().items():
        if user.startswith("agent-"):
            continue
        for subject in ("im.kv.default.sim-0", "im.kv.big.gpu-7", "im.pod.default.sim-0"):
            assert not allowed(ident.permissions.publish, subject), (user, subject)


def test_ingress_rights() -> None:
    ing = by_user()[INGRESS].permissions
    for subject in ("im.tokenize", "im.schedule", "im.req.default", "im.scale.default"):
        assert allowed(ing.publish, subject), subject
    assert allowed(ing.subscribe, "im.pod.default.sim-0")
    # Its own scheduler replica (schedule_here) follows what a scheduler follows: request
    # events, KV streams (read only), snapshots and lookups.
    assert allowed(ing.subscribe, "im.req.default") and allowed(ing.subscribe, "im.kv.default.p")
    assert allowed(ing.publish, "im.index.lookup") and allowed(ing.publish, "im.snapshot.p")
    assert not allowed(ing.publish, "im.kv.default.sim-0")
    assert not allowed(ing.subscribe, "im.schedule") and not allowed(ing.subscribe, "im.tokenize")
    assert ing.responses == 0  # not a responder: cannot answer anyone's request


def test_each_identity_reads_only_its_own_replies() -> None:
    ids = by_user()
    for user, ident in ids.items():
        mine = f"{inbox_prefix(user)}.abc.1"
        # The console sends no request: it reads no replies at all.
        assert allowed(ident.permissions.subscribe, mine) == (user != CONSOLE), user
        for other in ids:
            if other != user:
                assert not allowed(ident.permissions.subscribe,
                                   f"{inbox_prefix(other)}.abc.1"), (user, other)
        assert not allowed(ident.permissions.subscribe, "_INBOX.abc.1"), user


def test_responders_answer_discovery() -> None:
    ids = by_user()
    for user in ("agent-sim-0", "tokenizer", "indexer", "scheduler"):
        p = ids[user].permissions
        for subject in ("$SRV.PING", "$SRV.INFO.infermesh-indexer", "$SRV.STATS.x.y"):
            assert allowed(p.subscribe, subject), (user, subject)
        assert p.responses >= 1


def test_observer_only_reads_and_pings() -> None:
    obs = by_user()[OBSERVER].permissions
    assert allowed(obs.subscribe, "im.kv.default.sim-0")
    assert allowed(obs.subscribe, "im.req.default")
    assert set(obs.publish) == {"$SRV.PING", "$SRV.INFO", "$SRV.STATS"}
    assert obs.responses == 0


def test_prefix_is_applied_everywhere() -> None:
    for ident in identities("prod.a", PODS):
        p = ident.permissions
        for subject in (*p.publish, *p.subscribe):
            if subject.startswith(("$JS.", "$KV.")):  # the lease bucket, named by the prefix
                assert "prod_a_autoscaler" in subject, (ident.user, subject)
                continue
            assert subject.startswith(("prod.a.", "$SRV.", "_INBOX.")), (ident.user, subject)


def test_bad_pod_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        identities("im", [("a", "p"), ("b", "p")])
    with pytest.raises(ValueError, match="subject token"):
        identities("im", [("default", "bad.pod")])
    with pytest.raises(ValueError, match="subject token"):
        identities("im", [("default", ">")])


def test_server_config_text() -> None:
    ids = identities("im", PODS[:1])
    users = {i.user: f"pw-{i.user}" for i in ids}
    text = server_config(users, ids, max_payload=1024)
    assert "max_payload: 1024" in text
    assert 'user: "agent-sim-0", password: "pw-agent-sim-0"' in text
    assert 'publish: {allow: ["im.kv.default.sim-0", "im.pod.default.sim-0"]}' in text
    assert f'allow_responses: {{max: {AGENT_MAX_RESPONSES}, expires: "1m"}}' in text
    # The observer publishes nothing but pings; the tokenizer only routes passed on to schedulers.
    assert 'publish: {allow: ["im.schedule"]}' in text
    assert "tls" not in text
    tls = ServerTLS("/c.pem", "/k.pem", ca_file="/ca.pem", verify=True)
    t2 = server_config(None, tls=tls)
    assert "authorization" not in t2
    assert 'cert_file: "/c.pem"' in t2 and 'ca_file: "/ca.pem"' in t2 and "verify: true" in t2
    with pytest.raises(ValueError, match="ca_file"):
        ServerTLS("/c", "/k", verify=True).block()


def test_write_bus_auth_files_are_private(tmp_path: Path) -> None:
    auth = write_bus_auth(tmp_path, "im", PODS, max_payload=2048)
    assert stat.S_IMODE(auth.config_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(auth.config_file.parent.stat().st_mode) == 0o700
    assert set(auth.credentials) == set(by_user())
    text = auth.config_file.read_text()
    passwords = set()
    for user, path in auth.credentials.items():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        c = Credentials.read(path)
        assert c.user == user and len(c.password) >= 24
        # The server config holds a bcrypt hash of the password, never the password itself.
        assert c.password not in text
        hashed = re.search(rf'user: "{re.escape(user)}", password: "([^"]+)"', text)
        assert hashed and hashed.group(1).startswith("$2")
        assert bcrypt.checkpw(c.password.encode(), hashed.group(1).encode())
        passwords.add(c.password)
    assert len(passwords) == len(auth.credentials)  # no two identities share a password
    # Writing again (Tilt reloading its plan) keeps the passwords running clients hold; an
    # identity whose file is gone gets a fresh one. Every file stays private.
    old = Credentials.read(auth.credentials["indexer"]).password
    auth.credentials["scheduler"].unlink()
    again = write_bus_auth(tmp_path, "im", PODS)
    assert Credentials.read(again.credentials["indexer"]).password == old
    fresh = Credentials.read(again.credentials["scheduler"]).password
    assert fresh and fresh not in passwords
    for path in again.credentials.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "secret" not in repr(Credentials("agent-sim-0", "secret"))


def test_credentials_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="cannot read"):
        Credentials.read(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("user: x")
    with pytest.raises(CredentialsError, match="not JSON"):
        Credentials.read(bad)
    bad.write_text(json.dumps({"user": "x"}))
    with pytest.raises(CredentialsError, match="must hold"):
        Credentials.read(bad)


def test_client_options(tmp_path: Path) -> None:
    assert ClientSecurity().connect_options() == {}
    opts = ClientSecurity("scheduler", "pw").connect_options()
    assert opts == {"user": "scheduler", "password": "pw", "inbox_prefix": "_INBOX.scheduler"}
    assert "pw" not in repr(ClientSecurity("scheduler", "pw"))
    with pytest.raises(CredentialsError, match="needs a NATS user"):
        ClientSecurity(password="pw")
    with pytest.raises(CredentialsError, match="needs its key"):
        ClientSecurity(tls_cert="/c.pem")
    with pytest.raises(CredentialsError, match="TLS files"):
        ClientSecurity(tls_ca=str(tmp_path / "nope.pem")).connect_options()


def test_client_tls_context(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert = ca.issue_cert("127.0.0.1")
    chain, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    opts = ClientSecurity(tls_ca=str(ca_file), tls_cert=str(chain),
                          tls_key=str(key)).connect_options()
    ctx = opts["tls"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.get_ca_certs()  # the CA is loaded


def test_service_knobs_from_env_and_file(tmp_path: Path) -> None:
    env = {"X_NATS_USER": "tokenizer", "X_NATS_PASSWORD": "from-env"}
    sec = load_config(BusClientKnobs, env_prefix="X", env=env).bus_security()
    assert (sec.user, sec.password) == ("tokenizer", "from-env")
    path = Credentials("indexer", "from-file").write(tmp_path / "c.json")
    env2 = {**env, "X_NATS_CREDENTIALS": str(path)}
    sec2 = load_config(BusClientKnobs, env_prefix="X", env=env2).bus_security()
    assert (sec2.user, sec2.password) == ("indexer", "from-file")  # the file wins
    assert load_config(BusClientKnobs, env_prefix="X", env={}).bus_security() == ClientSecurity()


def test_every_service_config_has_the_knobs() -> None:
    from infermesh.services.agent.config import AgentConfig
    from infermesh.services.autoscaler.config import AutoscalerConfig
    from infermesh.services.indexer.config import IndexerConfig
    from infermesh.services.ingress.config import IngressConfig
    from infermesh.services.scheduler.config import SchedulerConfig
    from infermesh.services.tokenizer.config import TokenizerConfig

    for cls in (AgentConfig, AutoscalerConfig, IndexerConfig, IngressConfig, SchedulerConfig,
                TokenizerConfig):
        assert issubclass(cls, BusClientKnobs), cls
        cfg = cls(nats_user="u", nats_password="p")
        assert cfg.bus_security().connect_options()["inbox_prefix"] == "_INBOX.u"
