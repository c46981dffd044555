"""NATS connections that reconnect on their own, and typed request/reply over them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import nats
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from infermesh.proto import codec

from ..telemetry import get_logger, inject_context

T = TypeVar("T")

log = get_logger("bus")

ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"


class BusError(Exception):
    """Base of every failure of a bus call."""


class BusTimeout(BusError):
    """No reply within the timeout."""


class NoResponders(BusError):
    """Nobody subscribes to the subject (the service is down or not started yet)."""


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
    connect_timeout: float = 2.0,
    max_reconnect_attempts: int = -1,
    first_connect_timeout: float = 30.0,
    **kwargs: Any,
) -> Client:
    """Connect to NATS, retrying forever by default, and log every state change.

    A service that loses the bus keeps running and reconnects by itself; subscriptions are
    restored by nats-py on reconnect. The first connection is retried for up to
    ``first_connect_timeout`` seconds, so a service may start before the bus does.
    ``user``/``password``/``tls`` options pass through.
    """
    urls = servers.split(",") if isinstance(servers, str) else servers
    blog = log.bind(client=name)

    async def on_disconnect() -> None:
        blog.warning("bus_disconnected")

    async def on_reconnect() -> None:
        blog.info(
            "bus_reconnected", server=str(nc.connected_url.netloc if nc.connected_url else "")
        )

    async def on_error(e: Exception) -> None:
        blog.warning("bus_error", error=repr(e))

    async def on_closed() -> None:
        blog.info("bus_closed")

    nc = Client()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + first_connect_timeout
    while True:
        try:
            await _connect_once(
                nc,
                urls,
                name,
                connect_timeout,
                max_reconnect_attempts,
                on_disconnect,
                on_reconnect,
                on_error,
                on_closed,
                kwargs,
            )
            break
        except (TimeoutError, OSError, nats.errors.NoServersError) as e:
            if loop.time() >= deadline:
                raise BusError(f"cannot connect to NATS at {urls}: {e!r}") from e
            blog.info("bus_connect_retry", error=repr(e))
            nc = Client()
            await asyncio.sleep(0.25)
    blog.info("bus_connected", servers=urls)
    return nc


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


def _check_error(headers: dict[str, str] | None) -> None:
    if headers and ERROR_CODE_HEADER in headers:
        raise RemoteError(headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, ""))


async def request(
    nc: Client,
    subject: str,
    msg: msgspec.Struct,
    reply_type: type[T],
    *,
    timeout: float = 1.0,
) -> T:
    """Send ``msg`` and decode the reply as ``reply_type``.

    Raises :class:`BusTimeout`, :class:`NoResponders`, :class:`RemoteError` (the service said
    no) or ``codec.DecodeError`` (the reply is malformed). The current trace context travels in
    the headers.
    """
    try:
        resp = await nc.request(
            subject, codec.encode(msg), timeout=timeout, headers=inject_context()
        )
    except NoRespondersError:
        raise NoResponders(f"no responders on {subject}") from None
    except NatsTimeout:
        raise BusTimeout(f"no reply on {subject} within {timeout:.3f}s") from None
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
