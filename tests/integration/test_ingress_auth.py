"""Ingress API keys, per-key rate limits and HTTPS, against the whole system as processes.

One stack for the module (2 simulated engines) whose ingress reads a key file, plus a second
ingress on the same bus that serves HTTPS and takes its single key from the environment.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import trustme
import yaml
from prometheus_client.parser import text_string_to_metric_families

from infermesh.libs.bus import NatsServer
from infermesh.libs.process.ports import free_port_range
from infermesh.services.ingress.config import IngressConfig
from infermesh.services.ingress.service import IngressService

from ..conftest import ProcessManager
from ..stack import Stack, start_stack
from .helpers import wait_until

MODEL = "infermesh/tiny-llama"
ALICE = "sk-alice-0123456789"  # listed in the file as is
BOB = "sk-bob-abcdef"  # listed only by its sha256
LIMITED = "sk-limited-42"  # 2 requests/s, burst 3
METERED = "sk-metered-7"  # a generous limit: answers carry the rate headers
TLS_KEY = "sk-tls-env-key"  # the HTTPS ingress's single key, from INFERMESH_INGRESS_API_KEY
BODY = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3}


@dataclass
class World:
    stack: Stack
    tls_url: str
    ca: trustme.CA
    certs: dict[str, Path]

    @property
    def url(self) -> str:
        return self.stack.ingress_url

    def client_ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[World]:
    """The stack, its key file, certificates and the HTTPS ingress; all stopped at the end."""
    tmp = tmp_path_factory.mktemp("ingress-auth")
    keys = tmp / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"name": "alice", "key": ALICE},
        {"name": "bob", "sha256": hashlib.sha256(BOB.encode()).hexdigest()},
        {"name": "limited", "key": LIMITED, "rate": 2, "burst": 3},
        {"name": "metered", "key": METERED, "rate": 1000, "burst": 1000},
    ]}))
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    certs = {"cert": tmp / "cert.pem", "key": tmp / "key.pem", "ca": tmp / "ca.pem"}
    server_cert.cert_chain_pems[0].write_to_path(str(certs["cert"]))
    server_cert.private_key_pem.write_to_path(str(certs["key"]))
    ca.cert_pem.write_to_path(str(certs["ca"]))
    srv = NatsServer(max_payload=8 * 1024 * 1024)
    srv.start()
    pm = ProcessManager(tmp, model_dir)
    try:
        stack = start_stack(pm, srv, engines=2, api_keys_file=str(keys))
        port = free_port_range(1)
        pm.service("ingress", "--nats-url", srv.url, "--http-port", str(port),
                   "--tls-cert-file", str(certs["cert"]), "--tls-key-file", str(certs["key"]),
                   env={"INFERMESH_INGRESS_API_KEY": TLS_KEY}, name="ingress-tls")
        yield World(stack, f"https://127.0.0.1:{port}", ca, certs)
    finally:
        pm.stop_all()
        srv.stop()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _metrics(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], float]:
    """``(sample name, sorted label values) → value`` from an ingress's /metrics (no key)."""
    async with http.get(url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    assert "sk-" not in text  # key names only, never a secret
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())))] = s.value
    return out


async def test_missing_or_wrong_key_gets_401_with_the_openai_body(world: World) -> None:
    url = world.url + "/v1/completions"
    async with aiohttp.ClientSession() as http:
        before = await _metrics(http, world.url)
        cases = [({}, "missing"), (_bearer("sk-wrong"), "invalid"),
                 ({"Authorization": f"Basic {ALICE}"}, "malformed")]
        for headers, _ in cases:
            async with http.post(url, json=BODY, headers=headers) as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                assert r.content_type == "application/json"
                err = (await r.json())["error"]
                assert set(err) == {"message", "type", "param", "code"}
                assert (err["type"], err["param"], err["code"]) == \
                    ("invalid_request_error", None, "invalid_api_key")
                assert err["message"]
                assert "x-infermesh-endpoint" not in r.headers  # never routed
        async with http.get(world.url + "/v1/models") as r:
            assert r.status == 401
        for path in ("/health", "/metrics"):  # probes and scrapers stay open, as in vLLM
            async with http.get(world.url + path) as r:
                assert r.status == 200
        after = await _metrics(http, world.url)
    for _, reason in cases:
        key = ("infermesh_ingress_auth_failures_total", f"reason={reason}")
        want = 2 if reason == "missing" else 1  # + the /v1/models probe
        assert after[key] - before.get(key, 0.0) == want, reason


async def test_good_keys_are_routed_and_counted_by_name(world: World) -> None:
    async with aiohttp.ClientSession() as http:
        before = await _metrics(http, world.url)
        for key in (ALICE, BOB):
            async with http.post(world.url + "/v1/completions", json=BODY,
                                 headers=_bearer(key)) as r:
                data = await r.json()
                assert r.status == 200, data
                assert r.headers["x-infermesh-endpoint"] in world.stack.pods
                assert data["usage"]["completion_tokens"] == 3
                assert "x-ratelimit-limit-requests" not in r.headers  # these keys are unlimited
        # A streamed answer still carries the rate headers (set before its first byte).
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3, "stream": True}
        async with http.post(world.url + "/v1/chat/completions", json=chat,
                             headers=_bearer(METERED)) as r:
            body = await r.read()
            assert r.status == 200 and body.rstrip().endswith(b"data: [DONE]")
            assert r.headers["x-ratelimit-limit-requests"] == "1000"
            assert 990 <= int(r.headers["x-ratelimit-remaining-requests"]) < 1000
            assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        after = await _metrics(http, world.url)
    for name in ("alice", "bob", "metered"):
        series = ("infermesh_ingress_key_requests_total", f"key={name}")
        assert after[series] - before[series] == 1, name


async def test_openai_sdk_with_and_without_the_key(world: World) -> None:
    good = openai.AsyncOpenAI(base_url=world.url + "/v1", api_key=ALICE, max_retries=0)
    c = await good.completions.create(model=MODEL, prompt="Hello there", max_tokens=2)
    assert c.choices[0].text and c.usage is not None and c.usage.completion_tokens == 2
    assert [m.id for m in (await good.models.list()).data] == [MODEL]
    # The SDK will not send an empty key; "unused" is what clients of an open vLLM pass.
    for key in ("sk-not-a-key", "unused"):
        bad = openai.AsyncOpenAI(base_url=world.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        await bad.close()
    await good.close()


async def test_rate_limit_is_per_key_and_recovers(world: World) -> None:
    """16 requests at once on a 2/s burst-3 key get some 429s; 16 on another key at the same
    moment all pass; the 429s cost no tokenizer work; the limited key then recovers."""
    n = 16

    async def fire(http: aiohttp.ClientSession, key: str) -> tuple[int, dict[str, str], Any]:
        async with http.post(world.url + "/v1/completions", json=BODY,
                             headers=_bearer(key)) as r:
            return r.status, dict(r.headers), await r.json()

    async with aiohttp.ClientSession() as http:
        before = await _metrics(http, world.url)
        t0 = time.monotonic()
        results = await asyncio.gather(*[fire(http, LIMITED) for _ in range(n)],
                                       *[fire(http, ALICE) for _ in range(n)])
        burst_s = time.monotonic() - t0
        limited, other = results[:n], results[n:]
        assert [s for s, _, _ in other] == [200] * n  # the other key is not affected
        ok = [r for r in limited if r[0] == 200]
        refused = [r for r in limited if r[0] == 429]
        assert len(ok) + len(refused) == n
        assert len(ok) >= 3  # the burst always passes
        assert refused, "no 429 for 16 requests at once on a 2/s, burst-3 key"
        for _, headers, body in refused:
            assert int(headers["Retry-After"]) >= 1
            assert int(headers["retry-after-ms"]) >= 1
            assert headers["x-ratelimit-limit-requests"] == "3"
            assert headers["x-ratelimit-remaining-requests"] == "0"
            assert "x-infermesh-endpoint" not in headers
            err = body["error"]
            assert (err["type"], err["code"], err["param"]) == \
                ("requests", "rate_limit_exceeded", None)
        for _, headers, _ in ok:
            assert headers["x-ratelimit-limit-requests"] == "3"
            assert headers["x-infermesh-endpoint"] in world.stack.pods
        mid = await _metrics(http, world.url)
        # Refused before any tokenize or schedule work: one tokenizer call (a route, or a
        # tokenize when a route falls back) per served request.
        tok = "infermesh_ingress_route_trips_total", "outcome=ok"
        two = "infermesh_ingress_tokenize_seconds_count", ""
        assert (mid.get(tok, 0) - before.get(tok, 0)) + (mid[two] - before[two]) == len(ok) + n
        rl = "infermesh_ingress_rate_limited_total", "key=limited"
        assert mid[rl] - before[rl] == len(refused)
        assert mid[("infermesh_ingress_rate_limited_total", "key=alice")] == 0

        t1 = time.monotonic()

        async def recovered() -> bool:
            return (await fire(http, LIMITED))[0] == 200

        await wait_until(recovered, timeout=10, what="the limited key to be served again",
                         interval=0.1)
        recover_s = time.monotonic() - t1
    print(f"\nrate limit: {n} requests on the limited key in {burst_s:.2f}s: {len(ok)} served, "
          f"{len(refused)} refused (429); {n} on another key at the same time: all served; "
          f"limited key served again after {recover_s:.2f}s "
          f"(Retry-After said {min(int(h['Retry-After']) for _, h, _ in refused)}s)")


async def test_https_with_the_sdk_and_plain_http_fails(world: World) -> None:
    ctx = world.client_ssl()
    port = world.tls_url.rsplit(":", 1)[1]
    async with aiohttp.ClientSession() as http:
        async def healthy() -> bool:
            try:
                async with http.get(world.tls_url + "/health", ssl=ctx) as r:
                    return r.status == 200 and (await r.json())["pods"] == 2
            except aiohttp.ClientConnectorError:
                return False

        await wait_until(healthy, timeout=30, what="the HTTPS ingress")
        with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port
            async with http.get(f"http://127.0.0.1:{port}/health") as r:
                await r.read()
        with pytest.raises(aiohttp.ClientConnectorCertificateError):  # CA not trusted
            async with http.get(world.tls_url + "/health") as r:
                await r.read()
        async with http.post(world.tls_url + "/v1/completions", json=BODY, ssl=ctx) as r:
            assert r.status == 401  # the key from the environment is required
    async with openai.DefaultAsyncHttpxClient(verify=ctx) as h:
        sdk = openai.AsyncOpenAI(base_url=world.tls_url + "/v1", api_key=TLS_KEY,
                                 max_retries=0, http_client=h)
        c = await sdk.completions.create(model=MODEL, prompt="Over TLS", max_tokens=2)
        assert c.usage is not None and c.usage.completion_tokens == 2
        bad = openai.AsyncOpenAI(base_url=world.tls_url + "/v1", api_key=ALICE,
                                 max_retries=0, http_client=h)
        with pytest.raises(openai.AuthenticationError):  # a key of the other ingress
            await bad.completions.create(model=MODEL, prompt="Over TLS", max_tokens=2)


async def test_client_certificates_when_a_ca_is_given(world: World) -> None:
    """mTLS, in process on the module's bus: no client certificate, no connection."""
    ingress = IngressService(IngressConfig(nats_url=world.stack.nats.url, http_port=0,
                                    tls_cert_file=str(world.certs["cert"]),
                                    tls_key_file=str(world.certs["key"]),
                                    tls_ca_file=str(world.certs["ca"])))
    await ingress.start()
    try:
        url = f"https://127.0.0.1:{ingress.http_port}/health"
        no_cert = world.client_ssl()
        with_cert = world.client_ssl()
        world.ca.issue_cert("client@example.test").configure_cert(with_cert)
        async with aiohttp.ClientSession() as http:
            async with http.get(url, ssl=with_cert) as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with http.get(url, ssl=no_cert) as r:
                    await r.read()
    finally:
        await ingress.stop()


@pytest.mark.parametrize("args,fragment", [
    (["--tls-cert-file", "/nonexistent/cert.pem", "--tls-key-file", "/nonexistent/key.pem"],
     "tls_cert_file: no such file"),
    (["--tls-cert-file", "/nonexistent/cert.pem"], "give both or neither"),
    (["--api-keys-file", "/nonexistent/keys.yaml"], "cannot read API keys file"),
    (["--api-keys-file", "BAD"], "the name is used twice"),
])
def test_bad_settings_stop_the_start_with_a_clear_error(tmp_path: Path, args: list[str],
                                                        fragment: str) -> None:
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys:\n  - {name: a, key: k1}\n  - {name: a, key: k2}\n")
    args = [str(bad) if a == "BAD" else a for a in args]
    # Nothing listens on this bus URL: the error must come before any bus work.
    r = subprocess.run([sys.executable, "-m", "infermesh.services.ingress", "--nats-url",
                        "nats://127.0.0.1:1", "--http-port", "0", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr and "Traceback" not in r.stderr
