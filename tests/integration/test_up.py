"""`infermesh up` starts nats-server, the engines and their agents, and stops them all."""

from __future__ import annotations

import asyncio
import signal
import stat
import urllib.request
from pathlib import Path

import openai
import pytest

from infermesh.libs.bus import BusAuthError, Credentials, connect
from infermesh.libs.bus.security import ClientSecurity

from .helpers import free_ports, infermesh_up


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=2) as r:
        return int(r.status)


async def _check_bus_auth(url: str, observer: Path) -> None:
    """No credentials: refused. The observer's (as `up` printed them): connected."""
    with pytest.raises(BusAuthError):
        await asyncio.wait_for(connect(url, "anonymous"), 20)
    c = Credentials.read(observer)
    nc = await connect(url, "observer", security=ClientSecurity(c.user, c.password))
    assert nc.is_connected
    await nc.close()


def test_up_starts_everything_and_stops_on_sigterm(tmp_path: Path, model_dir: Path) -> None:
    engines = 2
    nats, sim, kv = free_ports(1), free_ports(engines), free_ports(2 * engines)
    ingress = free_ports(1)
    with infermesh_up(tmp_path, model_dir, [
            "--engines", str(engines), "--nats-port", str(nats), "--sim-port", str(sim),
            "--kv-port", str(kv), "--ingress-port", str(ingress)]) as (proc, log):
        text = log.read_text()
        assert f"nats://127.0.0.1:{nats}" in text
        for i in range(engines):
            assert f"http://127.0.0.1:{sim + i}" in text
            assert _get(f"http://127.0.0.1:{sim + i}/health") == 200
        # The bus has users (docs/security.md): anonymous clients are refused.
        observer = tmp_path / "state" / "bus" / "credentials" / "observer.json"
        assert f"--nats-credentials {observer}" in text
        assert stat.S_IMODE(observer.stat().st_mode) == 0o600
        asyncio.run(_check_bus_auth(f"nats://127.0.0.1:{nats}", observer))
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
    nats, sim, kv, ingress = free_ports(1), free_ports(1), free_ports(2), free_ports(1)
    with infermesh_up(tmp_path, model_dir, [
            "--engines", "1", "--nats-port", str(nats), "--sim-port", str(sim),
            "--kv-port", str(kv), "--ingress-port", str(ingress), "--api-keys-file", str(keys),
            "--ingress-tls-cert", str(cert_pem), "--ingress-tls-key", str(key_pem),
    ]) as (proc, log):
        base = f"https://127.0.0.1:{ingress}/v1"
        assert base in log.read_text()
        ctx = ssl.create_default_context(cafile=str(ca_pem))
        with openai.DefaultHttpxClient(verify=ctx) as http:
            good = openai.OpenAI(base_url=base, api_key="sk-team-a-123", http_client=http)
            c = good.completions.create(model="infermesh/tiny-llama", prompt="Hi", max_tokens=2)
            assert c.usage.completion_tokens == 2
            bad = openai.OpenAI(base_url=base, api_key="sk-wrong", http_client=http,
                                max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                bad.completions.create(model="infermesh/tiny-llama", prompt="Hi", max_tokens=2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
