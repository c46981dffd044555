"""The bus: NATS connections, typed request/reply, micro services, an embedded nats-server."""

from .client import (
    BusError,
    BusTimeout,
    NoResponders,
    RemoteError,
    connect,
    request,
    request_parts,
)
from .server import NatsServer, nats_server_binary
from .service import BusService, reply_error

__all__ = [
    "BusError",
    "BusService",
    "BusTimeout",
    "NatsServer",
    "NoResponders",
    "RemoteError",
    "connect",
    "nats_server_binary",
    "reply_error",
    "request",
    "request_parts",
]
