"""API key files, the token bucket, the auth middleware's answers and the TLS context."""

from __future__ import annotations

import hashlib
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry, generate_latest

from infermesh.libs.config import ConfigError, load_config
from infermesh.services.ingress.__main__ import main as ingress_main
from infermesh.services.ingress.auth import (
    KEY_NAME,
    ApiKeyGuard,
    ApiKeys,
    TokenBucket,
    _duration,
    digest_of,
    load_key_file,
    parse_key_entries,
    server_ssl_context,
)
from infermesh.services.ingress.config import IngressConfig

# ---------------------------------------------------------------------------------- bucket


def test_bucket_starts_full_then_refuses() -> None:
    b = TokenBucket(rate=2.0, capacity=3, now=100.0)
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert b.remaining(100.0) == 0
    assert b.wait_s(100.0) == pytest.approx(0.5)
    assert b.full_in_s(100.0) == pytest.approx(1.5)


def test_bucket_refills_at_its_rate_and_caps_at_capacity() -> None:
    b = TokenBucket(rate=2.0, capacity=3, now=0.0)
    for _ in range(3):
        assert b.take(0.0)
    assert not b.take(0.4)  # 0.8 of a token
    assert b.take(0.5)  # 1.0
    assert not b.take(0.5)
    assert b.remaining(1000.0) == 3  # long idle: full, not more
    assert b.wait_s(1000.0) == 0.0 and b.full_in_s(1000.0) == 0.0


def test_bucket_ignores_a_clock_that_goes_back() -> None:
    b = TokenBucket(rate=1.0, capacity=1, now=10.0)
    assert b.take(10.0)
    assert not b.take(5.0)
    assert b.take(11.0)


@pytest.mark.parametrize("rate,cap", [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_bucket_refuses_nonsense(rate: float, cap: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, cap, 0.0)


# ---------------------------------------------------------------------------------- key file


def _parse(*entries: dict[str, Any], rate: float = 0.0, burst: int = 0) -> ApiKeys:
    return ApiKeys(parse_key_entries({"keys": list(entries)}, "test", rate, burst), now=0.0)


def test_plain_and_hashed_keys_are_both_found() -> None:
    hexd = hashlib.sha256(b"sk-bob").hexdigest().upper()  # case does not matter
    keys = _parse({"name": "alice", "key": "sk-alice"}, {"name": "bob", "sha256": hexd})
    alice, bob = keys.lookup("sk-alice"), keys.lookup("sk-bob")
    assert alice is not None and alice.name == "alice" and alice.bucket is None
    assert bob is not None and bob.name == "bob"
    assert keys.lookup("sk-carol") is None and keys.lookup("") is None
    assert keys.names == ["alice", "bob"]


def test_limits_from_entry_win_over_defaults() -> None:
    keys = _parse({"name": "a", "key": "k1"}, {"name": "b", "key": "k2", "rate": 5, "burst": 7},
                  {"name": "c", "key": "k3", "rate": 0}, {"name": "d", "key": "k4", "rate": 2.5},
                  rate=1.0, burst=4)
    got = {k.name: (k.rate, k.burst, k.bucket is not None) for k in keys.by_digest.values()}
    assert got == {"a": (1.0, 4, True), "b": (5.0, 7, True), "c": (0.0, 0, False),
                   "d": (2.5, 4, True)}


def test_burst_defaults_to_the_rate_rounded_up() -> None:
    keys = _parse({"name": "a", "key": "k1", "rate": 2.5}, {"name": "b", "key": "k2",
                                                            "rate": 0.2})
    assert [k.burst for k in keys.by_digest.values()] == [3, 1]


@pytest.mark.parametrize("entries,fragment", [
    ([{"name": "a", "key": "k"}, {"name": "a", "key": "j"}], "used twice"),
    ([{"name": "a", "key": "k"}, {"name": "b", "sha256": hashlib.sha256(b"k").hexdigest()}],
     "already listed as 'a'"),
    ([{"name": "a", "key": "k", "sha256": "0" * 64}], "exactly one"),
    ([{"name": "a"}], "exactly one"),
    ([{"name": "a", "sha256": "abc"}], "64 hex digits"),
    ([{"name": "a", "sha256": "g" * 64}], "64 hex digits"),
    ([{"name": "a", "key": "k", "rate": -1}], "rate must be"),
    ([{"name": "a", "key": "k", "rate": 1, "burst": 0}], "burst must be"),
    ([{"name": "a", "key": "k", "rpm": 1}], "rpm"),
    ([{"name": "a", "key": "has space"}], "whitespace"),
    ([{"name": "a", "key": ""}], "non-empty"),
    ([{"name": "", "key": "k"}], "a name is"),
    ([{"name": "bad name!", "key": "k"}], "a name is"),
    ([{"key": "k"}], "name"),
    (["sk-plain-string"], "keys[0]"),
    ([], "empty"),
])
def test_bad_entries_are_refused(entries: list[Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match="test") as info:
        parse_key_entries({"keys": entries}, "test")
    assert fragment in str(info.value)


@pytest.mark.parametrize("doc", [None, [], "keys", {"key": []}, {"keys": "x"},
                                 {"keys": [], "extra": 1}])
def test_bad_documents_are_refused(doc: Any) -> None:
    with pytest.raises(ConfigError, match="test"):
        parse_key_entries(doc, "test")


def test_key_file_yaml_and_json(tmp_path: Path) -> None:
    y = tmp_path / "keys.yaml"
    y.write_text("keys:\n  - name: a\n    key: sk-a\n    rate: 2\n    burst: 3\n")
    j = tmp_path / "keys.json"
    j.write_text(json.dumps({"keys": [{"name": "b", "sha256": hashlib.sha256(b"sk-b")
                                       .hexdigest()}]}))
    (a,) = load_key_file(str(y))
    (b,) = load_key_file(str(j), rate=1.0)
    assert (a.name, a.digest, a.rate, a.burst) == ("a", digest_of("sk-a"), 2.0, 3)
    assert (b.name, b.digest, b.rate, b.burst) == ("b", digest_of("sk-b"), 1.0, 1)


def test_key_file_read_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read API keys file"):
        load_key_file(str(tmp_path / "absent.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("keys: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_key_file(str(bad))
    badj = tmp_path / "bad.json"
    badj.write_text("{'keys': []}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_key_file(str(badj))


def test_single_key_knob_joins_the_file(tmp_path: Path) -> None:
    f = tmp_path / "k.yaml"
    f.write_text("keys: [{name: a, key: sk-a}]\n")
    keys = ApiKeys.from_settings("sk-single", str(f), 0.0, 0)
    assert keys.names == ["a", "default"]
    assert len(ApiKeys.from_settings("", "", 1.0, 2)) == 0
    single = ApiKeys.from_settings("sk-single", "", 4.0, 0).lookup("sk-single")
    assert single is not None and (single.rate, single.burst) == (4.0, 4)
    with pytest.raises(ConfigError, match="same key"):
        ApiKeys.from_settings("sk-a", str(f), 0.0, 0)
    f.write_text("keys: [{name: default, key: sk-a}]\n")
    with pytest.raises(ConfigError, match="rename"):
        ApiKeys.from_settings("sk-b", str(f), 0.0, 0)
    with pytest.raises(ConfigError, match="whitespace"):
        ApiKeys.from_settings("sk bad", "", 0.0, 0)


def test_knobs_from_env_flags_and_their_checks() -> None:
    args = ingress_main.parser().parse_args(["--rate-limit-rps", "2", "--tls-cert-file", "c.pem",
                                      "--tls-key-file", "k.pem"])
    cfg = load_config(IngressConfig, args, env_prefix="INFERMESH_INGRESS",
                      env={"INFERMESH_INGRESS_API_KEY": "sk-env",
                           "INFERMESH_INGRESS_RATE_LIMIT_BURST": "5"})
    assert (cfg.api_key, cfg.rate_limit_rps, cfg.rate_limit_burst) == ("sk-env", 2.0, 5)
    assert (cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_ca_file) == ("c.pem", "k.pem", "")
    for bad in ({"tls_cert_file": "c.pem"}, {"tls_key_file": "k.pem"}, {"tls_ca_file": "ca"},
                {"rate_limit_rps": -1.0}, {"rate_limit_burst": -1}):
        with pytest.raises(ValueError):
            IngressConfig(**bad)  # type: ignore[arg-type]


def test_reset_durations_read_like_openai() -> None:
    assert [_duration(s) for s in (0.0, 0.0101, 0.5, 1.5, 59.0, 61.0, 125.2)] == \
        ["0ms", "11ms", "500ms", "1.5s", "59s", "1m1s", "2m6s"]


# ---------------------------------------------------------------------------------- middleware


async def _serve(keys: ApiKeys) -> tuple[TestServer, CollectorRegistry, list[str]]:
    reg = CollectorRegistry()
    seen: list[str] = []

    async def ok(request: web.Request) -> web.Response:
        seen.append(request.get(KEY_NAME, "-"))
        return web.json_response({"ok": True})

    app = web.Application()
    ApiKeyGuard(keys, reg).install(app)
    for path in ("/v1/completions", "/health", "/metrics"):
        app.router.add_get(path, ok)
    server = TestServer(app)
    await server.start_server()
    return server, reg, seen


async def test_middleware_answers_like_openai() -> None:
    keys = ApiKeys(parse_key_entries({"keys": [
        {"name": "free", "key": "sk-free"},
        {"name": "slow", "key": "sk-slow", "rate": 0.001, "burst": 2}]}, "t"))
    server, reg, seen = await _serve(keys)
    url = str(server.make_url("/v1/completions"))
    try:
        async with aiohttp.ClientSession() as s:
            for headers, reason in (({}, "missing"), ({"Authorization": "sk-free"}, "malformed"),
                                    ({"Authorization": "Bearer "}, "malformed"),
                                    ({"Authorization": "Bearer sk-nope"}, "invalid")):
                async with s.get(url, headers=headers) as r:
                    assert r.status == 401, reason
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
                    err = (await r.json())["error"]
                    assert (err["type"], err["code"], err["param"]) == \
                        ("invalid_request_error", "invalid_api_key", None)
            for path in ("/health", "/metrics"):  # open, as in vLLM
                async with s.get(server.make_url(path)) as r:
                    assert r.status == 200
            async with s.get(url, headers={"Authorization": "bearer  sk-free "}) as r:
                assert r.status == 200
                assert "x-ratelimit-limit-requests" not in r.headers  # no limit, no headers
            slow = {"Authorization": "Bearer sk-slow"}
            remaining = []
            for _ in range(2):
                async with s.get(url, headers=slow) as r:
                    assert r.status == 200
                    assert r.headers["x-ratelimit-limit-requests"] == "2"
                    remaining.append(r.headers["x-ratelimit-remaining-requests"])
                    assert r.headers["x-ratelimit-reset-requests"].endswith(("s", "ms"))
            assert remaining == ["1", "0"]
            async with s.get(url, headers=slow) as r:
                assert r.status == 429
                assert int(r.headers["Retry-After"]) >= 900  # a token every 1000 s
                assert int(r.headers["retry-after-ms"]) >= 900_000
                assert r.headers["x-ratelimit-remaining-requests"] == "0"
                err = (await r.json())["error"]
                assert (err["type"], err["code"]) == ("requests", "rate_limit_exceeded")
                assert "slow" in err["message"] and "sk-slow" not in err["message"]
    finally:
        await server.close()
    assert seen == ["-", "-", "free", "slow", "slow"]  # the 429 never reached the handler
    text = generate_latest(reg).decode()
    for line in ('infermesh_ingress_auth_failures_total{reason="missing"} 1.0',
                 'infermesh_ingress_auth_failures_total{reason="malformed"} 2.0',
                 'infermesh_ingress_auth_failures_total{reason="invalid"} 1.0',
                 'infermesh_ingress_rate_limited_total{key="slow"} 1.0',
                 'infermesh_ingress_rate_limited_total{key="free"} 0.0',
                 'infermesh_ingress_key_requests_total{key="slow"} 3.0',
                 'infermesh_ingress_key_requests_total{key="free"} 1.0'):
        assert line in text
    assert "sk-" not in text


async def test_no_keys_means_open() -> None:
    server, reg, seen = await _serve(ApiKeys([]))
    try:
        async with aiohttp.ClientSession() as s, s.get(server.make_url("/v1/completions")) as r:
            assert r.status == 200
    finally:
        await server.close()
    assert seen == ["-"]


# ---------------------------------------------------------------------------------- TLS


def test_ssl_context(tmp_path: Path) -> None:
    assert server_ssl_context("", "") is None
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert_file, key_file, ca_file = (tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem")
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    ctx = server_ssl_context(str(cert_file), str(key_file))
    assert ctx is not None and ctx.verify_mode == ssl.CERT_NONE
    mtls = server_ssl_context(str(cert_file), str(key_file), str(ca_file))
    assert mtls is not None and mtls.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ConfigError, match="no such file"):
        server_ssl_context(str(tmp_path / "absent.pem"), str(key_file))
    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        server_ssl_context(str(key_file), str(cert_file))  # swapped
    junk = tmp_path / "junk.pem"
    junk.write_text("not a pem\n")
    with pytest.raises(ConfigError, match="cannot load the TLS CA"):
        server_ssl_context(str(cert_file), str(key_file), str(junk))
