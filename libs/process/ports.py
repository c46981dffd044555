"""TCP ports: free ones for tests and `--*-port 0`, and a clear error when a wanted one is taken.

A free port is picked below the kernel's ephemeral range: a port handed out there could be taken
by any outgoing connection (a NATS client, an HTTP request) before its server binds it. Ports
this process handed out are not handed out again, so one plan never gets the same port twice.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable

_LOWEST = 10_000
_given: set[int] = set()
_rng = random.Random()


class PortBusy(RuntimeError):
    """A port the system needs is taken; the message names the port and the flag that moves it."""


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _pick(n: int, host: str) -> int | None:
    """A base of ``n`` consecutive bindable ports below the ephemeral range, none handed out."""
    top = _ephemeral_low() - n
    if top <= _LOWEST:
        return None
    if len(_given) > (top - _LOWEST) // 2:
        _given.clear()  # a long test session: start over rather than run dry
    for _ in range(500):
        base = _rng.randrange(_LOWEST, top)
        span = range(base, base + n)
        if any(p in _given for p in span):
            continue
        if all(port_free(p, host) for p in span):
            _given.update(span)
            return base
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now and was not handed out before."""
    return free_port_range(1, host)


def free_port_range(n: int, host: str = "127.0.0.1") -> int:
    """A base port with ``n`` consecutive free ports after it (checked by binding them)."""
    base = _pick(n, host)
    if base is not None:
        return base
    for _ in range(200):  # no room below the ephemeral range: let the kernel choose
        with socket.socket() as s:
            s.bind((host, 0))
            base = int(s.getsockname()[1])
        if base + n < 65_000 and all(port_free(base + i, host) for i in range(n)):
            return base
    raise RuntimeError(f"no range of {n} free ports on {host}")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound on ``host`` now (SO_REUSEADDR, as servers bind)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_ports_free(wanted: Iterable[tuple[int, str, str]], host: str = "127.0.0.1") -> None:
    """Raise :class:`PortBusy` for the first ``(port, what, flag)`` whose port is taken."""
    for port, what, flag in wanted:
        if not port_free(port, host):
            raise PortBusy(
                f"port {port} ({what}) on {host} is already in use; another infermesh may be "
                f"running, or pick another with {flag}"
            )
