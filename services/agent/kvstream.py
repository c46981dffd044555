"""The engine side of the agent: vLLM's ZMQ KV-event stream and its replay socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from infermesh.libs.telemetry import get_logger
from infermesh.proto.vllm_kv import REPLAY_END_SEQ

log = get_logger("agent.kvstream")

RawBatch = tuple[int, bytes]  # (engine seq, payload)


class ReplayError(Exception):
    """The replay request failed or timed out."""


async def replay(
    ctx: zmq.asyncio.Context, endpoint: str, start_seq: int, timeout: float
) -> list[RawBatch]:
    """Ask the engine's replay socket for every buffered batch with seq >= ``start_seq``.

    Accepts both framings vLLM has used for answers: ``[b"", topic, seq, payload]`` (0.32) and
    ``[b"", seq, payload]`` (others); the end is seq 0xFF…FF with an empty payload.
    """
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    out: list[RawBatch] = []
    try:
        await sock.send_multipart((b"", start_seq.to_bytes(8, "big")))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0 or not await sock.poll(int(left * 1000)):
                raise ReplayError(f"replay from {endpoint} timed out after {timeout}s")
            frames = await sock.recv_multipart()
            if frames and frames[0] == b"":
                frames = frames[1:]
            if len(frames) == 3:
                _topic, seq_b, payload = frames
            elif len(frames) == 2:
                seq_b, payload = frames
            else:
                raise ReplayError(f"unexpected replay frame count {len(frames)}")
            if seq_b == REPLAY_END_SEQ:
                return out
            if len(seq_b) != 8:
                raise ReplayError("replay seq frame is not 8 bytes")
            out.append((int.from_bytes(seq_b, "big"), payload))
    finally:
        sock.close(0)


class KVSubscriber:
    """A SUB socket on the engine's PUB endpoint that reports connection changes.

    ``on_disconnect`` runs when an established connection drops: the engine may be restarting,
    so the agent re-checks its identity at the next successful replay. The drop, not the
    reconnect, is reported because it happens exactly once per engine death, before the new
    engine can answer anything: a re-check triggered by it can never come after (and repeat)
    the rebuild from the new engine.
    """

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        topic: str,
        on_disconnect: Callable[[], None],
        hwm: int = 1_000_000,
    ) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)
        self.connected = asyncio.Event()
        self._ever_connected = False
        self._on_disconnect = on_disconnect
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            try:
                frames = await self._monitor.recv_multipart()
            except (asyncio.CancelledError, zmq.ZMQError):
                return
            ev = parse_monitor_message(frames)["event"]
            if ev == zmq.EVENT_CONNECTED:
                self.connected.set()
                if self._ever_connected:
                    log.info("engine_reconnected")
                self._ever_connected = True
            elif ev == zmq.EVENT_DISCONNECTED:
                self.connected.clear()
                log.warning("engine_disconnected")
                self._on_disconnect()

    async def close(self) -> None:
        """Close both sockets."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self._monitor.close(0)
        self.sock.close(0)
