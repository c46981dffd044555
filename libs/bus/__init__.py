"""The bus: NATS connections, typed request/reply, micro services, an embedded nats-server."""

from .client import (
    BUS_REGISTRY,
    BusAuthError,
    BusError,
    BusTimeout,
    NoResponders,
    RemoteError,
    connect,
    request,
    request_parts,
    settle,
)
from .lifecycle import cancel_tasks, release
from .security import (
    BusAuth,
    BusClientKnobs,
    ClientSecurity,
    Credentials,
    CredentialsError,
    ServerTLS,
    write_bus_auth,
)
from .server import NatsCluster, NatsServer, nats_server_binary
from .service import BusService, reply_error

__all__ = [
    "BUS_REGISTRY",
    "BusAuth",
    "BusAuthError",
    "BusClientKnobs",
    "BusError",
    "BusService",
    "BusTimeout",
    "ClientSecurity",
    "Credentials",
    "CredentialsError",
    "NatsCluster",
    "NatsServer",
    "NoResponders",
    "RemoteError",
    "ServerTLS",
    "cancel_tasks",
    "connect",
    "nats_server_binary",
    "release",
    "reply_error",
    "request",
    "request_parts",
    "settle",
    "write_bus_auth",
]
