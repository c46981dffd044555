"""libs/bus/client.py on a real nats-server: what a disconnect logs, and messages over the
server's max_payload refused before they are sent."""

from __future__ import annotations

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from structlog.testing import capture_logs

from infermesh.libs.bus import (
    BUS_REGISTRY,
    NatsServer,
    PayloadTooLarge,
    connect,
    fits,
    request,
    settle,
)
from infermesh.proto import codec
from infermesh.proto.messages import TokenizeReply

from .helpers import wait_until


async def ignore(_: Msg) -> None:
    """A subscription callback that does nothing."""


def disconnects(client: str) -> float:
    return BUS_REGISTRY.get_sample_value("infermesh_bus_disconnects_total",
                                         {"client": client}) or 0.0


def disconnect_logs(logs: list[dict[str, object]]) -> list[str]:
    """The levels of the ``bus_disconnected`` lines, in order."""
    return [str(e["log_level"]) for e in logs if e["event"] == "bus_disconnected"]


@pytest.mark.parametrize("how", ["close", "drain"])
async def test_closing_our_own_connection_is_not_a_warning(nats_server: NatsServer,
                                                           how: str) -> None:
    name = f"shutdown-{how}"
    with capture_logs() as logs:
        nc = await connect(nats_server.url, name)
        await nc.subscribe("im.x", cb=ignore)
        await getattr(nc, how)()
    assert nc.is_closed
    assert disconnect_logs(logs) == ["info"], logs  # said once, calmly
    assert [e["event"] for e in logs][-1] == "bus_closed"
    assert disconnects(name) == 0  # a shutdown is not a lost connection


async def test_losing_the_server_is_a_warning() -> None:
    srv = NatsServer().start()
    try:
        with capture_logs() as logs:
            nc = await connect(srv.url, "loser")
            srv.kill()
            await wait_until(lambda: "warning" in disconnect_logs(logs), timeout=10,
                             what="bus_disconnected warning")
            await nc.close()  # while reconnecting: the close itself is ours
    finally:
        srv.stop()
    assert disconnect_logs(logs) == ["warning", "info"], logs
    assert disconnects("loser") == 1


async def test_a_request_over_max_payload_is_refused_before_it_is_sent() -> None:
    srv = NatsServer().start()  # default max_payload: 1 MiB
    try:
        nc = await connect(srv.url, "big-sender")
        other: Client = await connect(srv.url, "responder")
        answer = TokenizeReply(num_tokens=1, block_keys=[7])

        async def respond(m: Msg) -> None:
            await m.respond(codec.encode(answer))

        await other.subscribe("im.echo", cb=respond)
        await settle(other)
        # The payload alone is under the limit, so nats-py would send it; with the headers the
        # server would not take it and would close the connection.
        data = b"\x00" * (nc.max_payload - 4)
        assert not fits(nc, data)
        with pytest.raises(PayloadTooLarge, match="max_payload"):
            await request(nc, "im.echo", data, TokenizeReply, timeout=2)
        # The connection is still up and usable.
        assert fits(nc, b"\x00" * 100)
        assert await request(nc, "im.echo", b"\x80", TokenizeReply, timeout=2) == answer
        assert nc.is_connected and disconnects("big-sender") == 0
        await other.close()
        await nc.close()
    finally:
        srv.stop()
