"""NATS connections that reconnect on their own, and typed request/reply over them."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgspec
import nats
from nats.aio.client import Client
from nats.errors import MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from prometheus_client import CollectorRegistry, Counter

from infermesh.proto import codec

from ..telemetry import get_logger, inject_context
from .security import ClientSecurity

T = TypeVar("T")

log = get_logger("bus")

# The state of this process's bus connections, served on every service's /metrics.
BUS_REGISTRY = CollectorRegistry()
_DISCONNECTS = Counter("infermesh_bus_disconnects", "Times a bus connection was lost",
                       ["client"], registry=BUS_REGISTRY)
_RECONNECTS = Counter("infermesh_bus_reconnects", "Times a lost bus connection came back",
                      ["client"], registry=BUS_REGISTRY)
_ERRORS = Counter("infermesh_bus_errors",
                  "Errors the NATS server reported to this client, by kind (refused: "
                  "credentials or TLS; permission_denied: a subject this identity may not use)",
                  ["client", "kind"], registry=BUS_REGISTRY)

ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"


class BusError(Exception):
    """Base of every failure of a bus call."""


class BusAuthError(BusError):
    """The server refused this client: wrong or missing credentials, or a TLS mismatch."""


class BusTimeout(BusError):
    """No reply within the timeout."""


class NoResponders(BusError):
    """Nobody subscribes to the subject (the service is down or not started yet)."""


class PayloadTooLarge(BusError):
    """The message is larger than the server takes in one message (its ``max_payload``)."""


class RemoteError(BusError):
    """The service answered with an error (``code`` as an HTTP-like status string)."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description


async def connect(
    servers: str | list[str],
    name: str,
    *,
    security: ClientSecurity | None = None,
    connect_timeout: float = 2.0,
    max_reconnect_attempts: int = -1,
    first_connect_timeout: float = 30.0,
    on_permission_denied: Callable[[Exception], None] | None = None,
    **kwargs: Any,
) -> Client:
    """Connect to NATS, retrying forever by default, and log every state change.

    A service that loses the bus keeps running and reconnects by itself; subscriptions are
    restored by nats-py on reconnect. The first connection is retried for up to
    ``first_connect_timeout`` seconds, so a service may start before the bus does.
    ``security`` gives the user, password and TLS settings (see ``libs/bus/security.py``).

    A server that refuses the credentials, or whose certificate does not verify, fails the first
    connection at once with :class:`BusAuthError`: retrying cannot fix a wrong password, and a
    service that exits with a clear message beats one that waits forever. After the first
    connection such errors are logged and the client keeps trying (credentials may be rotated).

    The server reports a subject this identity may not use after the fact, through nats-py's
    error callback; ``on_permission_denied`` gets each such error instead of the error log (a
    tool that tells its user itself), and the ``permission_denied`` counter counts it either way.
    """
    urls = servers.split(",") if isinstance(servers, str) else servers
    blog = log.bind(client=name, **({"user": security.user} if security and security.user else {}))
    options = {**(security.connect_options() if security is not None else {}), **kwargs}
    loop = asyncio.get_running_loop()
    refused: asyncio.Future[Exception] = loop.create_future()
    connected_once = False

    async def on_disconnect() -> None:
        if nc.closing:
            # Our own close() or drain() (a shutdown): `bus_closed` follows; nothing was lost.
            blog.info("bus_disconnected", closing=True)
            return
        _DISCONNECTS.labels(name).inc()
        blog.warning("bus_disconnected")

    async def on_reconnect() -> None:
        _RECONNECTS.labels(name).inc()
        blog.info(
            "bus_reconnected", server=str(nc.connected_url.netloc if nc.connected_url else "")
        )

    async def on_error(e: Exception) -> None:
        if _is_refusal(e):
            if not connected_once and not refused.done():
                refused.set_result(e)
            _ERRORS.labels(name, "refused").inc()
            blog.error("bus_refused", error=repr(e))
        elif "permissions violation" in str(e).lower():
            # Our own permission lists or code are wrong: loud, but the connection stays up.
            _ERRORS.labels(name, "permission_denied").inc()
            if on_permission_denied is not None:
                on_permission_denied(e)
            else:
                blog.error("bus_permission_denied", error=str(e))
        else:
            _ERRORS.labels(name, "other").inc()
            blog.warning("bus_error", error=repr(e))

    async def on_closed() -> None:
        blog.info("bus_closed")

    nc = _Client()
    deadline = loop.time() + first_connect_timeout
    while True:
        attempt = asyncio.ensure_future(_connect_once(
            nc,
            urls,
            name,
            connect_timeout,
            max_reconnect_attempts,
            on_disconnect,
            on_reconnect,
            on_error,
            on_closed,
            options,
        ))
        left = max(0.0, deadline - loop.time())
        waiters: set[asyncio.Future[Any]] = {attempt, refused}
        await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if not attempt.done() and not refused.done():
            # nats-py retries the first connection forever with max_reconnect_attempts=-1.
            await _abandon(nc, attempt)
            raise BusError(f"cannot connect to NATS at {urls} within {first_connect_timeout}s")
        if refused.done():
            await _abandon(nc, attempt)
            raise BusAuthError(
                f"NATS at {urls} refused client {name!r}"
                f"{f' (user {security.user!r})' if security and security.user else ''}: "
                f"{refused.result()!r}; check the credentials and TLS settings"
            )
        try:
            attempt.result()
            break
        except (TimeoutError, OSError, nats.errors.NoServersError) as e:
            if loop.time() >= deadline:
                raise BusError(f"cannot connect to NATS at {urls}: {e!r}") from e
            blog.info("bus_connect_retry", error=repr(e))
            nc = _Client()
            await asyncio.sleep(0.25)
    connected_once = True
    blog.info("bus_connected", servers=urls)
    return nc


class _Client(Client):
    """A nats-py client that knows whether its own user closed it.

    nats-py calls the disconnected callback in the same state (closed) when this process closes
    or drains the connection and when the server ends it for good, so the callback cannot tell a
    shutdown from a loss without this flag.
    """

    closing = False

    async def close(self) -> None:
        self.closing = True
        await super().close()

    async def drain(self) -> None:
        self.closing = True
        try:
            await super().drain()
        except BaseException:
            self.closing = self.is_closed  # refused (reconnecting): still ours to lose
            raise


async def _abandon(nc: Client, attempt: asyncio.Future[None]) -> None:
    """Stop a connection attempt in progress and release what it holds."""
    attempt.cancel()
    with contextlib.suppress(BaseException):
        await attempt
    with contextlib.suppress(Exception):
        await nc.close()


def _is_refusal(e: Exception) -> bool:
    """Whether ``e`` says the server will not take this client as configured."""
    if isinstance(e, nats.errors.AuthorizationError):
        return True
    # A handshake the server or we reject (bad or missing certificate, no common protocol);
    # a connection cut mid-handshake (EOF) may be a restarting server and is retried.
    if isinstance(e, ssl.SSLError) and not isinstance(e, (ssl.SSLEOFError,
                                                          ssl.SSLZeroReturnError)):
        return True
    text = str(e).lower()
    return "authorization violation" in text or "tls required" in text


async def _connect_once(
    nc: Client,
    urls: list[str],
    name: str,
    connect_timeout: float,
    max_reconnect_attempts: int,
    on_disconnect: Any,
    on_reconnect: Any,
    on_error: Any,
    on_closed: Any,
    kwargs: dict[str, Any],
) -> None:
    await nc.connect(
        servers=urls,
        name=name,
        # nats-py annotates these as int but uses them as seconds of any precision.
        connect_timeout=connect_timeout,  # type: ignore[arg-type]
        reconnect_time_wait=0.25,  # type: ignore[arg-type]
        max_reconnect_attempts=max_reconnect_attempts,
        allow_reconnect=True,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        error_cb=on_error,
        closed_cb=on_closed,
        **kwargs,
    )


async def settle(nc: Client) -> None:
    """Return once the server has processed every command this client sent, SUBs included.

    nats-py's ``flush()`` (2.16) writes its PING straight to the socket, ahead of commands still
    in its pending buffer, so a subscription made just before can reach the server after the
    PONG: a request from another client then finds no responders (measured: 6 in 300). The
    first flush pushes that buffer out; the second PING goes behind it.
    """
    await nc.flush()
    await nc.flush()


def _check_error(headers: dict[str, str] | None) -> None:
    if headers and ERROR_CODE_HEADER in headers:
        raise RemoteError(headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, ""))


def message_size(payload: bytes, headers: Mapping[str, str] | None) -> int:
    """Bytes of one message that the server holds against its ``max_payload``: the payload and
    the headers as nats-py writes them (an empty mapping still sends the ``NATS/1.0`` line)."""
    if headers is None:
        return len(payload)
    lines = sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())  # "k: v\r\n"
    return len(payload) + len(b"NATS/1.0\r\n\r\n") + lines


def fits(nc: Client, payload: bytes) -> bool:
    """Whether ``payload``, with the trace headers :func:`request` adds, fits in one message.

    Above the server's ``max_payload`` nats-py refuses the payload, and a server that gets one
    anyway (the headers are not counted by nats-py) closes the whole connection.
    """
    return message_size(payload, inject_context()) <= nc.max_payload


async def request(
    nc: Client,
    subject: str,
    msg: msgspec.Struct | bytes,
    reply_type: type[T],
    *,
    timeout: float = 1.0,
) -> T:
    """Send ``msg`` (a Struct, or one already encoded) and decode the reply as ``reply_type``.

    Raises :class:`BusTimeout`, :class:`NoResponders`, :class:`RemoteError` (the service said
    no), :class:`PayloadTooLarge` (nothing was sent) or ``codec.DecodeError`` (the reply is
    malformed). The current trace context travels in the headers.
    """
    data = msg if isinstance(msg, bytes) else codec.encode(msg)
    headers = inject_context()
    size = message_size(data, headers)
    if size > nc.max_payload:
        raise PayloadTooLarge(f"a {size}-byte request on {subject} is over the bus's "
                              f"max_payload of {nc.max_payload} bytes")
    try:
        resp = await nc.request(subject, data, timeout=timeout, headers=headers)
    except NoRespondersError:
        raise NoResponders(f"no responders on {subject}") from None
    except NatsTimeout:
        raise BusTimeout(f"no reply on {subject} within {timeout:.3f}s") from None
    except MaxPayloadError:  # the limit changed since the check (a reconnect to another node)
        raise PayloadTooLarge(f"a {size}-byte request on {subject} is over the bus's "
                              f"max_payload of {nc.max_payload} bytes") from None
    _check_error(resp.headers)
    return codec.decode(resp.data, reply_type)


async def request_parts(
    nc: Client,
    subject: str,
    msg: msgspec.Struct,
    reply_type: type[T],
    *,
    parts_of: Callable[[T], tuple[int, int]],
    timeout: float = 5.0,
) -> list[T]:
    """Send ``msg`` and collect a multi-part reply, in part order.

    ``parts_of(reply)`` gives ``(part, parts)``. The whole set must arrive within ``timeout``;
    a missing part raises :class:`BusTimeout`.
    """
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    got: dict[int, T] = {}
    total: int | None = None
    try:
        await nc.publish(subject, codec.encode(msg), reply=inbox, headers=inject_context())
        deadline = asyncio.get_running_loop().time() + timeout
        while total is None or len(got) < total:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise BusTimeout(f"multi-part reply on {subject} incomplete after {timeout:.1f}s")
            try:
                m = await sub.next_msg(timeout=left)
            except NatsTimeout:
                continue
            if m.headers and m.headers.get("Status") == "503":
                raise NoResponders(f"no responders on {subject}")
            _check_error(m.headers)
            part = codec.decode(m.data, reply_type)
            idx, total = parts_of(part)
            got[idx] = part
    finally:
        await sub.unsubscribe()
    return [got[i] for i in range(total)]
