"""API keys, per-key rate limits and TLS of the ingress.

Keys come from a file (``api_keys_file``) and/or one key given directly (``api_key``, the same role
as vLLM's ``--api-key``). A file entry holds the key itself or only its sha256 hex digest, so the
file need not hold secrets. Presented keys are hashed and looked up by digest: the comparison never
runs over the secret, so its timing says nothing about how much of a guess was right.

Rate limits are token buckets, one per key, built once at start-up: a request takes one token, a
key refills at ``rate`` tokens per second up to ``burst``. The limit is per ingress process; N
replicas behind a load balancer allow N times the rate.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from infermesh.libs.config import ConfigError
from infermesh.libs.telemetry import get_logger

log = get_logger("ingress.auth")

SINGLE_KEY_NAME = "default"
"""Name of the key given by the ``api_key`` knob (in metrics and logs)."""

OPEN_PATHS = frozenset({"/health", "/metrics"})
"""Paths that never ask for a key (probes and scrapers), as in vLLM."""



def _request_key(name: str, kind: type) -> Any:
    """A typed request-storage key where aiohttp has them (3.13+), a plain string before."""
    factory = getattr(web, "RequestKey", None)
    return factory(name, kind) if factory is not None else name


KEY_NAME: Any = _request_key("infermesh.api_key_name", str)
"""Request item holding the name (never the secret) of the key that authenticated the request."""

_RATE_STATE: Any = _request_key("infermesh.rate_state", tuple)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_json = msgspec.json.Encoder()


# ---------------------------------------------------------------------------------- rate limits


class TokenBucket:
    """``capacity`` requests at once, refilled at ``rate`` per second (monotonic clock times)."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: int, now: float) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError("a token bucket needs rate > 0 and capacity >= 1")
        self.rate = rate
        self.capacity = capacity
        self.tokens = float(capacity)
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float) -> bool:
        """Take one token if there is one; False means the request is over the limit."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def remaining(self, now: float) -> int:
        """Whole tokens left."""
        self._refill(now)
        return int(self.tokens)

    def wait_s(self, now: float) -> float:
        """Seconds until the next token (0 when one is there)."""
        self._refill(now)
        return max(0.0, (1.0 - self.tokens) / self.rate)

    def full_in_s(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        self._refill(now)
        return max(0.0, (self.capacity - self.tokens) / self.rate)


# ---------------------------------------------------------------------------------- key store


@dataclass(slots=True)
class ApiKey:
    """One accepted key: its name, the sha256 of the secret, and its bucket (None: no limit)."""

    name: str
    digest: bytes
    rate: float = 0.0
    burst: int = 0
    bucket: TokenBucket | None = None


class _KeyEntry(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    key: str | None = None
    sha256: str | None = None
    rate: float | None = None
    burst: int | None = None


class _KeyFile(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[dict[str, Any]]


def digest_of(secret: str) -> bytes:
    """The sha256 of a key as presented by a client."""
    return hashlib.sha256(secret.encode()).digest()


def default_burst(rate: float) -> int:
    """The burst used when none is set: the rate rounded up, at least one request."""
    return max(1, math.ceil(rate))


def _limits(rate: float, burst: int | None, where: str) -> tuple[float, int]:
    if not math.isfinite(rate) or rate < 0:
        raise ConfigError(f"{where}: rate must be a number >= 0 (0: no limit), not {rate!r}")
    if burst is not None and burst < 1:
        raise ConfigError(f"{where}: burst must be at least 1, not {burst!r}")
    if rate == 0:
        return 0.0, 0
    return float(rate), burst if burst is not None else default_burst(rate)


def _check_secret(secret: str, where: str) -> None:
    if not secret or secret != secret.strip() or any(c.isspace() for c in secret):
        raise ConfigError(f"{where}: a key must be non-empty and hold no whitespace")


def parse_key_entries(data: Any, source: str, rate: float = 0.0, burst: int = 0) -> list[ApiKey]:
    """Validate a decoded key file ``{"keys": [{name, key|sha256, rate, burst}]}``.

    ``rate`` and ``burst`` are the defaults for entries that set none (0: no limit / derived).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must hold a mapping with a `keys` list")
    try:
        doc = msgspec.convert(data, _KeyFile)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{source}: {e}") from None
    if not doc.keys:
        raise ConfigError(f"{source}: `keys` is empty; to serve without keys, drop the file")
    out: list[ApiKey] = []
    names: set[str] = set()
    digests: dict[bytes, str] = {}
    for i, raw in enumerate(doc.keys):
        where = f"{source}: keys[{i}]"
        try:
            entry = msgspec.convert(raw, _KeyEntry)
        except msgspec.ValidationError as err:
            raise ConfigError(f"{where}: {err}") from None
        where = f"{source}: key {entry.name!r}"
        if not _NAME_RE.match(entry.name):
            raise ConfigError(f"{where}: a name is 1-64 letters, digits, '.', '_' or '-'")
        if entry.name in names:
            raise ConfigError(f"{where}: the name is used twice")
        if (entry.key is None) == (entry.sha256 is None):
            raise ConfigError(f"{where}: give exactly one of `key` and `sha256`")
        if entry.key is not None:
            _check_secret(entry.key, where)
            digest = digest_of(entry.key)
        else:
            hexd = (entry.sha256 or "").strip().lower()
            if not _HEX_RE.match(hexd):
                raise ConfigError(f"{where}: `sha256` must be 64 hex digits (sha256sum of the key)")
            digest = bytes.fromhex(hexd)
        if digest in digests:
            raise ConfigError(f"{where}: the same key is already listed as {digests[digest]!r}")
        # An entry's own limits win; the knobs fill what it leaves out.
        r, b = _limits(rate if entry.rate is None else entry.rate,
                       entry.burst if entry.burst is not None else (burst or None), where)
        names.add(entry.name)
        digests[digest] = entry.name
        out.append(ApiKey(entry.name, digest, r, b))
    return out


def load_key_file(path: str, rate: float = 0.0, burst: int = 0) -> list[ApiKey]:
    """Read and validate a key file (JSON when it ends in ``.json``, YAML otherwise)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read API keys file {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"API keys file {path} is not valid "
                          f"{'JSON' if path.endswith('.json') else 'YAML'}: {e}") from None
    return parse_key_entries(data, f"API keys file {path}", rate, burst)


class ApiKeys:
    """The accepted keys, found by the digest of what a client presents."""

    def __init__(self, keys: list[ApiKey], now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        self.by_digest: dict[bytes, ApiKey] = {}
        for k in keys:
            if k.digest in self.by_digest:
                raise ConfigError(f"API key {k.name!r} is the same key as "
                                  f"{self.by_digest[k.digest].name!r}")
            if k.rate > 0:
                k.bucket = TokenBucket(k.rate, k.burst, t)
            self.by_digest[k.digest] = k

    def __len__(self) -> int:
        return len(self.by_digest)

    @property
    def names(self) -> list[str]:
        """Names of the keys, in file order."""
        return [k.name for k in self.by_digest.values()]

    def lookup(self, secret: str) -> ApiKey | None:
        """The key a client presented, or None."""
        return self.by_digest.get(digest_of(secret))

    @classmethod
    def from_settings(cls, api_key: str, api_keys_file: str, rate: float, burst: int) -> ApiKeys:
        """Keys from the ``api_key`` and ``api_keys_file`` knobs; empty when neither is set."""
        keys = load_key_file(api_keys_file, rate, burst) if api_keys_file else []
        if api_key:
            _check_secret(api_key, "api_key")
            if any(k.name == SINGLE_KEY_NAME for k in keys):
                raise ConfigError(f"api_key is named {SINGLE_KEY_NAME!r}, which the keys file "
                                  "also uses; rename that entry")
            r, b = _limits(rate, burst or None, "api_key")
            keys.append(ApiKey(SINGLE_KEY_NAME, digest_of(api_key), r, b))
        return cls(keys)


# ---------------------------------------------------------------------------------- HTTP side


def _error_body(message: str, type_: str, code: str) -> bytes:
    return _json.encode({"error": {"message": message, "type": type_, "param": None,
                                   "code": code}})


_MISSING_BODY = _error_body(
    "No API key was sent. Send it in the Authorization header: `Authorization: Bearer <key>`.",
    "invalid_request_error", "invalid_api_key")
_MALFORMED_BODY = _error_body(
    "The Authorization header must read `Bearer <key>`.", "invalid_request_error",
    "invalid_api_key")
_INVALID_BODY = _error_body(
    "The API key sent is not valid for this server.", "invalid_request_error", "invalid_api_key")


def _duration(s: float) -> str:
    """``x-ratelimit-reset-requests`` style: ``250ms``, ``1.5s``, ``2m0s``."""
    if s < 1:
        return f"{math.ceil(s * 1000)}ms"
    if s < 60:
        return f"{s:.3g}s"
    m, rest = divmod(int(math.ceil(s)), 60)
    return f"{m}m{rest}s"


class ApiKeyGuard:
    """aiohttp middleware: 401 without a valid key, 429 over the key's rate, rate headers."""

    def __init__(self, keys: ApiKeys, registry: CollectorRegistry) -> None:
        self.keys = keys
        self.auth_failures = Counter("infermesh_ingress_auth_failures",
                                     "Requests refused for a missing, malformed or unknown API key",
                                     ["reason"], registry=registry)
        self.rate_limited = Counter("infermesh_ingress_rate_limited",
                                    "Requests refused (429) for going over their key's rate limit",
                                    ["key"], registry=registry)
        self.key_requests = Counter("infermesh_ingress_key_requests",
                                    "Authenticated requests by key name (rate-limited included)",
                                    ["key"], registry=registry)
        if not keys:
            return
        for name in keys.names:  # series exist from the start, so rates read 0, not absent
            self.key_requests.labels(name)
            self.rate_limited.labels(name)
        for reason in ("missing", "malformed", "invalid"):
            self.auth_failures.labels(reason)

    def install(self, app: web.Application) -> None:
        """Add the middleware and the rate-header hook to ``app`` (no-op without keys)."""
        if not self.keys:
            return
        app.middlewares.append(self.middleware)
        app.on_response_prepare.append(self._add_rate_headers)

    def _refuse(self, reason: str, body: bytes, remote: str | None) -> web.Response:
        self.auth_failures.labels(reason).inc()
        log.debug("auth_refused", reason=reason, remote=remote)
        challenge = 'Bearer realm="infermesh"'
        if reason != "missing":
            challenge += ', error="invalid_token"'
        return web.Response(status=401, body=body, content_type="application/json",
                            headers={"WWW-Authenticate": challenge})

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Check the key before any other work (tokenize, schedule) is done."""
        if request.path in OPEN_PATHS or request.method == "OPTIONS":
            return await handler(request)  # type: ignore[no-any-return]
        header = request.headers.get("Authorization")
        if header is None:
            return self._refuse("missing", _MISSING_BODY, request.remote)
        scheme, _, secret = header.strip().partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            return self._refuse("malformed", _MALFORMED_BODY, request.remote)
        key = self.keys.lookup(secret)
        if key is None:
            return self._refuse("invalid", _INVALID_BODY, request.remote)
        request[KEY_NAME] = key.name
        self.key_requests.labels(key.name).inc()
        bucket = key.bucket
        if bucket is None:
            return await handler(request)  # type: ignore[no-any-return]
        now = time.monotonic()
        allowed = bucket.take(now)
        request[_RATE_STATE] = (bucket.capacity, bucket.remaining(now), bucket.full_in_s(now))
        if allowed:
            return await handler(request)  # type: ignore[no-any-return]
        self.rate_limited.labels(key.name).inc()
        wait = bucket.wait_s(now)
        log.debug("rate_limited", key=key.name, retry_after_s=round(wait, 3))
        body = _error_body(
            f"Rate limit reached for API key '{key.name}': {key.rate:g} requests per second, "
            f"burst {key.burst}. Try again in {wait:.2f}s.", "requests", "rate_limit_exceeded")
        return web.Response(status=429, body=body, content_type="application/json",
                            headers={"Retry-After": str(max(1, math.ceil(wait))),
                                     "retry-after-ms": str(max(1, math.ceil(wait * 1000)))})

    async def _add_rate_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        state = request.get(_RATE_STATE)
        if state is None:
            return
        limit, remaining, reset_s = state
        response.headers["x-ratelimit-limit-requests"] = str(limit)
        response.headers["x-ratelimit-remaining-requests"] = str(remaining)
        response.headers["x-ratelimit-reset-requests"] = _duration(reset_s)


# ---------------------------------------------------------------------------------- TLS


def server_ssl_context(cert_file: str, key_file: str, ca_file: str = "") -> ssl.SSLContext | None:
    """The HTTPS context for the ingress (None without a certificate); client certs with a CA."""
    if not cert_file and not key_file:
        return None
    for what, path in (("tls_cert_file", cert_file), ("tls_key_file", key_file),
                       ("tls_ca_file", ca_file)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{what}: no such file: {path}")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"cannot load the TLS certificate {cert_file} with key {key_file}: "
                          f"{e}") from None
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"cannot load the TLS CA file {ca_file}: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
