"""KV events on ZMQ exactly as vLLM's ZmqEventPublisher sends them.

PUB socket: ``[topic, seq (8-byte big-endian), payload]`` per batch, seq counting from 0 since the
engine started. ROUTER replay socket: a client sends ``[b"", start_seq]`` (a DEALER adds the empty
delimiter) and receives every buffered batch with seq >= start_seq as
``[b"", topic, seq, payload]``, then ``[b"", b"", 0xFF*8, b""]``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import zmq
import zmq.asyncio

from infermesh.libs.telemetry import get_logger
from infermesh.proto.vllm_kv import REPLAY_END_SEQ

log = get_logger("sim.publisher")


class ZmqKVPublisher:
    """Publishes encoded EventBatch payloads with vLLM's framing and serves replays."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        replay_endpoint: str | None,
        topic: str = "",
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        bind: bool | None = None,
    ) -> None:
        self._pub = ctx.socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        # vLLM binds when the endpoint is a wildcard or ipc/inproc, and connects otherwise
        # ("bind stable, connect volatile"); ``bind`` overrides that for the simulator.
        if bind is None:
            bind = "*" in endpoint or "::" in endpoint or endpoint.startswith(
                ("ipc://", "inproc://"))
        if bind:
            self._pub.bind(endpoint)
            endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self._pub.connect(endpoint)
        self.endpoint = endpoint
        self._replay: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        if replay_endpoint:
            self._replay = ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._topic = topic.encode()
        #: the settings vLLM reports for its publisher (``GET /kv_event_sources``)
        self.topic = topic
        self.buffer_steps = buffer_steps
        self.hwm = hwm
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self._task: asyncio.Task[None] | None = None
        self.replay_requests = 0
        self.bad_replay_requests = 0

    @property
    def next_seq(self) -> int:
        """The seq the next batch will carry."""
        return self._seq

    def start(self) -> None:
        """Start serving replay requests."""
        if self._replay is not None and self._task is None:
            self._task = asyncio.create_task(self._serve_replay())

    async def publish(self, payload: bytes) -> int:
        """Send one batch; return its seq."""
        seq = self._seq
        self._seq += 1
        await self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
        self._buffer.append((seq, payload))
        return seq

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            try:
                frames = await self._replay.recv_multipart()
            except (asyncio.CancelledError, zmq.ContextTerminated):
                return
            except zmq.ZMQError as e:
                log.warning("replay_recv_failed", error=str(e))
                continue
            # [identity, b"", start_seq]; anything else is ignored, as vLLM does.
            if len(frames) != 3 or len(frames[2]) != 8:
                self.bad_replay_requests += 1
                log.warning("replay_request_invalid", frames=len(frames))
                continue
            self.replay_requests += 1
            ident = frames[0]
            start = int.from_bytes(frames[2], "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await self._replay.send_multipart(
                        (ident, b"", self._topic, seq.to_bytes(8, "big"), payload)
                    )
            await self._replay.send_multipart((ident, b"", b"", REPLAY_END_SEQ, b""))

    async def close(self) -> None:
        """Stop serving and close both sockets."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pub.close(0)
        if self._replay is not None:
            self._replay.close(0)
