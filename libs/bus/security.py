"""Who may say what on the bus: NATS users, per-service subject permissions, TLS.

The server side is a nats-server config file written from the list of pods: one user per
identity (``agent-<pod>`` for each pod, ``tokenizer``, ``indexer``, ``scheduler``, ``ingress``,
``autoscaler``, ``console``, and a read-only ``observer``), each allowed exactly the subjects its
service publishes and subscribes to (docs/security.md has the table). Every identity that sends
requests reads replies on its own inbox prefix (``_INBOX.<user>``), so one cannot read another's
replies; responders answer through ``allow_responses`` rather than a publish right on inboxes,
so none can forge a reply to a request it did not receive.

The client side is :class:`BusClientKnobs`, the knobs every service config inherits, and
:class:`ClientSecurity`, which turns them into nats-py ``connect`` options. Passwords travel in a
file (``nats_credentials``, written 0600) or an environment variable, never on a command line.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt

from infermesh.proto.subjects import DEFAULT_PREFIX, Subjects, check_token

from ..config import knob

OBSERVER = "observer"
TOKENIZER = "tokenizer"
INDEXER = "indexer"
SCHEDULER = "scheduler"
INGRESS = "ingress"
AUTOSCALER = "autoscaler"
CONSOLE = "console"
SERVICE_IDENTITIES = (TOKENIZER, INDEXER, SCHEDULER, INGRESS, AUTOSCALER, CONSOLE)

# nats-py micro answers discovery on `$SRV.<VERB>`, `$SRV.<VERB>.<name>` and `.<name>.<id>`.
_DISCOVERY = tuple(
    f"$SRV.{verb}{tail}" for verb in ("PING", "INFO", "STATS") for tail in ("", ".>")
)

# An agent answers one snapshot request with one message per part; other responders answer once.
AGENT_MAX_RESPONSES = 1_000_000
# A reply right lapses after this long, so requests never answered do not pile up in the server.
RESPONSE_TTL = "1m"


class CredentialsError(ValueError):
    """A credentials file or a set of security knobs that cannot be used."""


DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def credentials_path(state_dir: str | Path, user: str) -> Path:
    """Where :func:`write_bus_auth` keeps ``user``'s credentials under ``state_dir``."""
    return Path(state_dir) / "bus" / "credentials" / f"{check_token(user, 'NATS user')}.json"


def agent_user(pod: str) -> str:
    """The NATS user of the agent of ``pod``."""
    return f"agent-{check_token(pod, 'pod')}"


def inbox_prefix(user: str) -> str:
    """The inbox prefix of ``user``: replies to its requests arrive under ``<prefix>.>``."""
    return f"_INBOX.{check_token(user, 'NATS user')}"


@dataclass(frozen=True)
class Permissions:
    """What one identity may publish and subscribe to, and how many replies per request it sends.

    ``responses`` 0 means it never answers requests; ``n`` means up to ``n`` messages to the reply
    subject of each request it received, within :data:`RESPONSE_TTL`.
    """

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    responses: int = 0


@dataclass(frozen=True)
class Identity:
    """One NATS user and its permissions."""

    user: str
    permissions: Permissions

    def __post_init__(self) -> None:
        check_token(self.user, "NATS user")


def identities(prefix: str, pods: Iterable[tuple[str, str]]) -> list[Identity]:
    """Every identity of a deployment with subject ``prefix`` and these ``(pool, pod)`` engines.

    The lists follow what the services do (grep ``publish``/``subscribe``/``request`` and the
    ``BusService`` endpoints): a service that gains a subject needs a line here, and
    tests/integration/test_bus_security.py fails on any permission violation of the real stack.
    """
    s = Subjects(prefix)
    out: list[Identity] = []
    seen: set[str] = set()
    for pool, pod in pods:
        user = agent_user(pod)
        if user in seen:
            raise ValueError(f"pod {pod!r} is listed twice (pod names are unique across pools)")
        seen.add(user)
        out.append(Identity(user, Permissions(
            publish=(s.kv(pool, pod), s.pod_state(pool, pod)),
            subscribe=(s.kv_snapshot(pod), *_DISCOVERY, inbox_prefix(user) + ".>"),
            responses=AGENT_MAX_RESPONSES,
        )))
    out += [
        Identity(TOKENIZER, Permissions(
            # Routes are passed on to the schedulers with the caller's reply subject.
            publish=(s.schedule,),
            subscribe=(s.tokenize, s.route, *_DISCOVERY, inbox_prefix(TOKENIZER) + ".>"),
            responses=1,
        )),
        Identity(INDEXER, Permissions(
            # Snapshot requests to agents (a subject tree of their own: the KV-stream
            # subscription does not deliver other indexers' requests).
            publish=(s.kv_snapshot_all,),
            subscribe=(s.kv_all, s.pod_state_all, s.index_lookup, *_DISCOVERY,
                       inbox_prefix(INDEXER) + ".>"),
            responses=1,
        )),
        Identity(SCHEDULER, Permissions(
            # Lookups to indexers, or its own local index: KV streams and snapshot requests.
            publish=(s.index_lookup, s.kv_snapshot_all, s.req_all),
            subscribe=(s.pod_state_all, s.req_all, s.schedule, s.kv_all, *_DISCOVERY,
                       inbox_prefix(SCHEDULER) + ".>"),
            responses=1,
        )),
        Identity(INGRESS, Permissions(
            # Requests to the tokenizer and scheduler, request events, scale demand; and, for
            # its own scheduler replica (schedule_here), what a scheduler follows: request
            # events, KV streams, snapshot requests and lookups.
            publish=(s.tokenize, s.route, s.schedule, s.req_all, f"{prefix}.scale.*",
                     s.index_lookup, s.kv_snapshot_all),
            subscribe=(s.pod_state_all, s.req_all, s.kv_all, inbox_prefix(INGRESS) + ".>"),
        )),
        Identity(AUTOSCALER, Permissions(
            # Decisions out; heartbeats, request events and the ingresses' demand in; the
            # leader lease (JetStream KV: its API and its keys; answers come to the inbox).
            publish=(s.scale_all, *s.autoscaler_lease_subjects()),
            subscribe=(s.pod_state_all, s.req_all, s.scale_all, inbox_prefix(AUTOSCALER) + ".>"),
        )),
        Identity(CONSOLE, Permissions(
            # Reads what it shows (heartbeats, request events, scale decisions and demand),
            # and nothing else: it publishes nothing, sends no request, so reads no inbox.
            subscribe=(s.pod_state_all, s.req_all, s.scale_all),
        )),
        Identity(OBSERVER, Permissions(
            # Read-only: every subject of the deployment, and discovery pings (whose answers
            # come back to its own inbox) for readiness checks.
            publish=tuple(d for d in _DISCOVERY if not d.endswith(">")),
            subscribe=(f"{prefix}.>", inbox_prefix(OBSERVER) + ".>"),
        )),
    ]
    return out


def pool_agent_user(pool: str) -> str:
    """The NATS user shared by the agents of ``pool`` where pod names are not known ahead."""
    return f"agent-{check_token(pool, 'pool')}"


def cluster_identities(prefix: str, pools: Iterable[str]) -> list[Identity]:
    """Every identity of a Kubernetes deployment (``infermesh nats-auth``, docs/kubernetes.md).

    Pods come and go under names nobody knows ahead, so the agents of one pool share one user,
    ``agent-<pool>``, which may publish the KV streams and heartbeats of any pod of that pool
    (and of no other pool): the unit of trust is the pool, where :func:`identities` makes it
    the pod. The services' identities are those of :func:`identities`.
    """
    s = Subjects(prefix)
    out: list[Identity] = []
    for pool in dict.fromkeys(pools):
        user = pool_agent_user(pool)
        out.append(Identity(user, Permissions(
            publish=(f"{s.prefix}.kv.{check_token(pool, 'pool')}.*", f"{s.prefix}.pod.{pool}.*"),
            subscribe=(s.kv_snapshot_all, *_DISCOVERY, inbox_prefix(user) + ".>"),
            responses=AGENT_MAX_RESPONSES,
        )))
    return out + identities(prefix, ())


def _q(value: str) -> str:
    """A quoted string of the nats-server config language (JSON escapes are understood)."""
    return json.dumps(value)


def _list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_q(v) for v in values) + "]"


# bcrypt cost of the server's password hashes. nats-server checks the hash on every connect, so
# the cost is paid again by every client at every reconnect; the passwords are 192 random bits,
# which no cost factor makes any harder to guess, so a low one keeps reconnect storms cheap.
BCRYPT_COST = 6


def hash_password(password: str, cost: int = BCRYPT_COST) -> str:
    """The bcrypt hash nats-server accepts in place of a plain password."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()


def authorization_block(users: Mapping[str, str], identities_: Iterable[Identity]) -> str:
    """The ``authorization { users = [...] }`` block; ``users`` maps each user to its password
    (plain, or a bcrypt hash as :func:`write_bus_auth` writes)."""
    lines = ["authorization {", "  users = ["]
    for ident in identities_:
        p = ident.permissions
        perms = [f"publish: {{allow: {_list(p.publish)}}}" if p.publish
                 else 'publish: {deny: [">"]}',
                 f"subscribe: {{allow: {_list(p.subscribe)}}}" if p.subscribe
                 else 'subscribe: {deny: [">"]}']
        if p.responses:
            perms.append(f"allow_responses: {{max: {p.responses}, expires: {_q(RESPONSE_TTL)}}}")
        lines.append(f"    {{user: {_q(ident.user)}, password: {_q(users[ident.user])},")
        lines.append(f"     permissions: {{{', '.join(perms)}}}}}")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ServerTLS:
    """The server's certificate; with ``ca_file`` and ``verify`` it also demands client certs."""

    cert_file: str
    key_file: str
    ca_file: str = ""
    verify: bool = False

    def block(self) -> str:
        """The ``tls { ... }`` block of the server config."""
        lines = ["tls {", f"  cert_file: {_q(self.cert_file)}", f"  key_file: {_q(self.key_file)}"]
        if self.ca_file:
            lines.append(f"  ca_file: {_q(self.ca_file)}")
        if self.verify:
            if not self.ca_file:
                raise ValueError("verifying client certificates needs ca_file")
            lines.append("  verify: true")
        lines.append("  timeout: 2")
        return "\n".join(lines) + "\n}\n"


def server_config(
    users: Mapping[str, str] | None,
    identities_: Iterable[Identity] = (),
    *,
    tls: ServerTLS | None = None,
    max_payload: int | None = None,
) -> str:
    """A nats-server config (no listen address: the command line gives it).

    Other configs (a cluster node's) can ``include`` it.
    """
    note = " Holds passwords or their hashes: keep it 0600." if users is not None else ""
    parts = [f"# Written by infermesh (libs/bus/security.py).{note}\n"]
    if max_payload:
        parts.append(f"max_payload: {int(max_payload)}\n")
    if users is not None:
        parts.append(authorization_block(users, identities_))
    if tls is not None:
        parts.append(tls.block())
    return "".join(parts)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner may read (also when it existed before)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Credentials:
    """One identity's user and password, as a service reads them from its credentials file."""

    user: str
    password: str = field(repr=False)

    def write(self, path: str | Path) -> Path:
        """Write the file (JSON, mode 0600)."""
        p = Path(path)
        _write_private(p, json.dumps({"user": self.user, "password": self.password}) + "\n")
        return p

    @classmethod
    def read(cls, path: str | Path) -> Credentials:
        """Read a credentials file; raise :class:`CredentialsError` naming what is wrong."""
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise CredentialsError(f"cannot read NATS credentials file {path}: {e}") from None
        except ValueError as e:
            raise CredentialsError(f"NATS credentials file {path} is not JSON: {e}") from None
        if (not isinstance(data, dict) or not isinstance(data.get("user"), str)
                or not isinstance(data.get("password"), str) or not data["user"]):
            raise CredentialsError(
                f'NATS credentials file {path} must hold {{"user": "...", "password": "..."}}'
            )
        return cls(data["user"], data["password"])


@dataclass(frozen=True)
class BusAuth:
    """What :func:`write_bus_auth` wrote: the server config and one credentials file per user."""

    config_file: Path
    credentials: Mapping[str, Path]
    tls_ca: str = ""

    def credentials_file(self, user: str) -> Path:
        """The credentials file of ``user`` (``KeyError`` for an unknown identity)."""
        return self.credentials[user]

    def client(self, user: str) -> ClientSecurity:
        """Client options for ``user`` (what a launcher's own connections use)."""
        creds = Credentials.read(self.credentials[user])
        return ClientSecurity(user=creds.user, password=creds.password, tls_ca=self.tls_ca)


def write_bus_auth(
    state_dir: str | Path,
    prefix: str,
    pods: Iterable[tuple[str, str]],
    *,
    tls: ServerTLS | None = None,
    tls_ca: str = "",
    max_payload: int | None = None,
) -> BusAuth:
    """Generate users and passwords for a deployment and write them under ``state_dir/bus``.

    Writes ``nats-auth.conf`` (the server config, for ``nats-server -c`` or an ``include``) and
    ``credentials/<user>.json`` for every identity, all 0600 in a 0700 folder. ``tls_ca`` is the CA
    the clients verify the server with (with ``tls`` given and no ``tls_ca``: ``tls.ca_file``).
    A user whose credentials file is already there keeps its password, so writing again (Tilt
    re-reading its plan, a test that started the server first) does not lock out running clients.
    """
    idents = identities(prefix, pods)
    users: dict[str, str] = {}
    for i in idents:
        try:
            users[i.user] = Credentials.read(credentials_path(state_dir, i.user)).password
        except CredentialsError:
            users[i.user] = secrets.token_urlsafe(24)
    folder = Path(state_dir) / "bus"
    creds_dir = folder / "credentials"
    creds_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    os.chmod(creds_dir, 0o700)
    conf = folder / "nats-auth.conf"
    # The server keeps only bcrypt hashes; the plain passwords live in the credentials files.
    hashed = {u: hash_password(pw) for u, pw in users.items()}
    _write_private(conf, server_config(hashed, idents, tls=tls, max_payload=max_payload))
    files = {u: Credentials(u, pw).write(credentials_path(state_dir, u))
             for u, pw in users.items()}
    ca = tls_ca or (tls.ca_file if tls is not None else "")
    return BusAuth(conf, files, ca)


# ---------------------------------------------------------------------------------------- client


@dataclass(frozen=True)
class ClientSecurity:
    """How one client authenticates and whether it speaks TLS; see :meth:`connect_options`."""

    user: str = ""
    password: str = field(default="", repr=False)
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def __post_init__(self) -> None:
        if self.user:
            check_token(self.user, "NATS user")
        if self.password and not self.user:
            raise CredentialsError("a NATS password needs a NATS user")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise CredentialsError("a NATS TLS client certificate needs its key, and vice versa")

    @property
    def tls(self) -> bool:
        """Whether this client brings its own TLS settings."""
        return bool(self.tls_ca or self.tls_cert)

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context verifying the server with ``tls_ca`` (else the system CAs)."""
        try:
            ctx = ssl.create_default_context(cafile=self.tls_ca or None)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise CredentialsError(f"cannot load NATS TLS files: {e}") from None
        return ctx

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for nats-py ``Client.connect``."""
        opts: dict[str, Any] = {}
        if self.user:
            opts["user"] = self.user
            opts["password"] = self.password
            opts["inbox_prefix"] = inbox_prefix(self.user)
        if self.tls:
            opts["tls"] = self.ssl_context()
        return opts


@dataclass
class BusAddress:
    """Where the bus is: the first two knobs of every service that talks on it."""

    nats_url: str = knob(DEFAULT_NATS_URL, "NATS server URL(s), comma-separated")
    subject_prefix: str = knob(DEFAULT_PREFIX, "Prefix of every bus subject")


@dataclass
class BusClientKnobs:
    """The NATS authentication and TLS knobs every service config inherits."""

    nats_credentials: str = knob(
        "", "File with this client's NATS user and password (JSON, as `infermesh up` writes)"
    )
    nats_user: str = knob("", "NATS user (unless nats_credentials names a file)")
    nats_password: str = knob(
        "", "NATS password: give it by environment variable or config file, not as a flag "
        "(command lines are visible to every local user)"
    )
    nats_tls_ca: str = knob(
        "", "CA certificate to verify a TLS NATS server with (empty: system CAs when the "
        "server requires TLS)"
    )
    nats_tls_cert: str = knob("", "Client certificate, for a NATS server that verifies clients")
    nats_tls_key: str = knob("", "Key of nats_tls_cert")

    def bus_security(self) -> ClientSecurity:
        """The client options these knobs ask for (reads the credentials file, if any)."""
        user, password = self.nats_user, self.nats_password
        if self.nats_credentials:
            creds = Credentials.read(self.nats_credentials)
            user, password = creds.user, creds.password
        return ClientSecurity(user=user, password=password, tls_ca=self.nats_tls_ca,
                              tls_cert=self.nats_tls_cert, tls_key=self.nats_tls_key)


@dataclass
class BusKnobs(BusClientKnobs, BusAddress):
    """Every bus knob of a service: where the bus is, who this client is, TLS. Service configs
    inherit it, so the knobs are declared (and documented) once."""
