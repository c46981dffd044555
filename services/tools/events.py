"""`infermesh events tail SUBJECT`: decode and print live bus messages as JSON lines.

With no flags it tails the bus of the running `infermesh up`: its run file (``run.json`` in the
state directory) gives the URL, the subject prefix and the observer's credentials and CA. Flags
and ``INFERMESH_EVENTS_*`` variables override it; a ``--nats-url`` of another bus leaves the run
file out entirely (its credentials are not for that bus).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
from dataclasses import dataclass

import msgspec

from infermesh.libs.bus import (
    BusClientKnobs,
    BusError,
    ClientSecurity,
    CredentialsError,
    connect,
    settle,
)
from infermesh.libs.bus.security import OBSERVER
from infermesh.libs.config import ConfigError, add_arguments, knob, load_config
from infermesh.libs.process.runfile import (
    RunFile,
    pid_alive,
    read_run_file,
    run_file_path,
)
from infermesh.libs.telemetry import configure_logging
from infermesh.proto import codec
from infermesh.proto.subjects import DEFAULT_PREFIX, Subjects

ENV_PREFIX = "INFERMESH_EVENTS"
PROG = "infermesh events tail"
# Who the client is: with any of these given, the run file's observer credentials stay out.
_IDENTITY = frozenset({"nats_credentials", "nats_user", "nats_password"})


@dataclass
class EventsConfig(BusClientKnobs):
    """The bus knobs of `infermesh events tail` (flags, env ``INFERMESH_EVENTS_*``)."""

    nats_url: str = knob("nats://127.0.0.1:4222",
                         "NATS server URL(s), comma-separated (unset: the running `infermesh "
                         "up`'s, from its run file)")
    subject_prefix: str = knob(DEFAULT_PREFIX, "Prefix of every bus subject, to decode messages "
                               "by (unset: the run file's)")
    state_dir: str = knob("", "State directory of the `infermesh up` whose run file gives the "
                          "defaults (empty: $INFERMESH_STATE_DIR, else "
                          "$XDG_STATE_HOME/infermesh, else ~/.local/state/infermesh)")


def resolve_config(args: argparse.Namespace | None = None) -> tuple[EventsConfig, RunFile | None]:
    """The knobs to tail with, and the run file they took defaults from (None: none used).

    Layers, lowest first: built-in defaults, the run file, ``INFERMESH_EVENTS_*``, flags.
    """
    env = dict(os.environ)
    cfg = load_config(EventsConfig, args, env_prefix=ENV_PREFIX, env=env)
    given = {f.name for f in dataclasses.fields(EventsConfig)
             if (args is not None and getattr(args, f.name, None) is not None)
             or f"{ENV_PREFIX}_{f.name.upper()}" in env}
    run = read_run_file(cfg.state_dir or None)
    if run is None:
        if cfg.state_dir:
            raise ConfigError(f"no run file of `infermesh up` at {run_file_path(cfg.state_dir)}")
        return cfg, None
    if "nats_url" in given and cfg.nats_url != run.nats_url:
        return cfg, None  # another bus than the run's
    fill: dict[str, str] = {}
    if run.nats_url and "nats_url" not in given:
        fill["nats_url"] = run.nats_url
    if run.subject_prefix and "subject_prefix" not in given:
        fill["subject_prefix"] = run.subject_prefix
    # The run file names absolute paths; a relative one is taken from its own folder.
    here = run_file_path(cfg.state_dir or None).parent
    if run.observer_credentials and not given & _IDENTITY:
        fill["nats_credentials"] = str(here / run.observer_credentials)
    if run.nats_tls_ca and "nats_tls_ca" not in given:
        fill["nats_tls_ca"] = str(here / run.nats_tls_ca)
    return dataclasses.replace(cfg, **fill), run


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


class SubscriptionDenied(BusError):
    """The server refused the subscription: this identity may not read the subject."""


async def tail(url: str, subject: str, subject_prefix: str, count: int, timeout: float | None,
               security: ClientSecurity | None = None) -> int:
    """Print messages on ``subject`` until ``count`` were printed, a timeout or a signal.

    Raises :class:`SubscriptionDenied` at once when the server refuses the subscription.
    """
    subjects = Subjects(subject_prefix)
    denied: list[Exception] = []
    nc = await connect(url, "events-tail", security=security,
                       on_permission_denied=denied.append)
    done = asyncio.Event()
    seen = 0

    async def on_msg(msg: object) -> None:
        nonlocal seen
        sys.stdout.buffer.write(render(subjects, msg.subject, msg.data) + b"\n")  # type: ignore[attr-defined]
        sys.stdout.flush()
        seen += 1
        if count and seen >= count:
            done.set()

    try:
        await nc.subscribe(subject, cb=on_msg)
        # The server answers a refused SUB with an error ahead of the PONG, and nats-py hands it
        # to the error callback before the flush returns, so the check below is not a race.
        await settle(nc)
        if denied:
            user = security.user if security is not None and security.user else ""
            who = f"NATS user {user!r}" if user else "this client (no NATS user)"
            hint = (f"; the {OBSERVER} may read {subject_prefix + '.>'!r}"
                    if user == OBSERVER else "")
            raise SubscriptionDenied(f"{who} may not subscribe to {subject!r} "
                                     f"(server: {denied[0]}){hint}")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            pass
    finally:
        await nc.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of `infermesh events`."""
    p = argparse.ArgumentParser(prog="infermesh events", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("tail", help="print live messages on SUBJECT (wildcards allowed)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("subject", help="e.g. 'im.kv.>' or 'im.pod.*.*'")
    t.add_argument("--count", type=int, default=0, help="stop after N messages (0: never)")
    t.add_argument("--timeout", type=float, default=None, help="stop after S seconds")
    # --nats-url, --subject-prefix, --state-dir and, on a secured bus, the identity
    # (docs/security.md); env INFERMESH_EVENTS_*.
    add_arguments(t, EventsConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    # Logs go to stderr, and only problems: stdout carries the JSON lines.
    configure_logging("events", level=None if "INFERMESH_LOG_LEVEL" in os.environ else "warning")
    try:
        cfg, run = resolve_config(args)
        security = cfg.bus_security()
    except (ConfigError, CredentialsError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(tail(cfg.nats_url, args.subject, cfg.subject_prefix, args.count,
                                args.timeout, security))
    except BusError as e:
        stale = (f" (from {run_file_path(cfg.state_dir or None)}, whose `infermesh up` "
                 f"pid {run.pid} is not running)"
                 if run is not None and not isinstance(e, SubscriptionDenied)
                 and not pid_alive(run.pid) else "")
        print(f"{PROG}: {e}{stale}", file=sys.stderr)
        return 1
