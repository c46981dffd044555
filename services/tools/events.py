"""`infermesh events tail SUBJECT`: decode and print live bus messages as JSON lines."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import msgspec

from infermesh.libs.bus import BusClientKnobs, ClientSecurity, connect
from infermesh.libs.config import add_arguments, load_config
from infermesh.libs.telemetry import configure_logging
from infermesh.proto import codec
from infermesh.proto.subjects import DEFAULT_PREFIX, Subjects


def render(subjects: Subjects, subject: str, data: bytes) -> bytes:
    """One JSON line for a message: subject, decoded payload (or the decode error)."""
    kind = codec.message_type_for_subject(subjects, subject)
    out: dict[str, object] = {"subject": subject}
    if kind is None:
        try:
            out["raw"] = msgspec.msgpack.decode(data)
        except msgspec.DecodeError:
            out["raw_bytes"] = len(data)
    else:
        try:
            out["msg"] = codec.decode(data, kind)
        except codec.DecodeError as e:
            out["error"] = str(e)
    return msgspec.json.encode(out)


async def tail(url: str, subject: str, prefix: str, count: int, timeout: float | None,
               security: ClientSecurity | None = None) -> int:
    """Print messages on ``subject`` until ``count`` were printed, a timeout or a signal."""
    subjects = Subjects(prefix)
    nc = await connect(url, "events-tail", security=security)
    done = asyncio.Event()
    seen = 0

    async def on_msg(msg: object) -> None:
        nonlocal seen
        sys.stdout.buffer.write(render(subjects, msg.subject, msg.data) + b"\n")  # type: ignore[attr-defined]
        sys.stdout.flush()
        seen += 1
        if count and seen >= count:
            done.set()

    await nc.subscribe(subject, cb=on_msg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except TimeoutError:
        pass
    await nc.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="infermesh events", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("tail", help="print live messages on SUBJECT (wildcards allowed)")
    t.add_argument("subject", help="e.g. 'im.kv.>' or 'im.pod.*.*'")
    t.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    t.add_argument("--prefix", default=DEFAULT_PREFIX, help="subject prefix of the deployment")
    t.add_argument("--count", type=int, default=0, help="stop after N messages (0: never)")
    t.add_argument("--timeout", type=float, default=None, help="stop after S seconds")
    # On a secured bus: the observer's credentials (docs/security.md); env INFERMESH_EVENTS_*.
    add_arguments(t, BusClientKnobs)
    args = p.parse_args(argv)
    configure_logging("events")  # logs go to stderr; stdout carries only the JSON lines
    security = load_config(BusClientKnobs, args, env_prefix="INFERMESH_EVENTS").bus_security()
    return asyncio.run(tail(args.nats_url, args.subject, args.prefix, args.count, args.timeout,
                            security))
