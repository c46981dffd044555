"""The decode side's wire to prefill engines: reading held blocks and heartbeating leases.

The read is one ``POST /sim/kv_transfer/{id}`` to the prefill engine's HTTP address, so a
decode depends on its prefill engine being alive, as a NIXL read does: a refused or reset
connection, a timeout, or an answer naming other blocks is a failed transfer. An unknown
or expired lease (410) is *not* a failure: vLLM's pull reads the (possibly reused) memory
all the same and only the prefill engine notices ("Potentially invalid KV blocks ...
retrieved"), so the decode goes on.
"""

from __future__ import annotations

import enum
from urllib.parse import quote

import aiohttp
import msgspec

from infermesh.libs.telemetry import get_logger

from .nixl import HEARTBEAT_PATH, KVHeartbeat, KVPull, RemotePrefill

__all__ = ["KVTransferClient", "PullOutcome"]

log = get_logger("sim.kv")


class PullOutcome(enum.Enum):
    """How one read of remote blocks ended."""

    LOADED = "loaded"
    STALE = "stale"  # the lease was gone: read anyway, as vLLM's pull does
    FAILED = "failed"


def _base(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class KVTransferClient:
    """One engine's HTTP client to the prefill engines it reads from."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._encoder = msgspec.json.Encoder()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def pull(self, remote: RemotePrefill) -> PullOutcome:
        """Read ``remote``'s blocks; the prefill engine releases them."""
        if remote.problem is not None:
            log.warning("kv_transfer_unusable", remote_request_id=remote.request_id,
                        problem=remote.problem)
            return PullOutcome.FAILED
        url = (_base(remote.host, remote.port)
               + f"/sim/kv_transfer/{quote(remote.request_id, safe='')}")
        body = self._encoder.encode(KVPull(remote.engine_id, list(remote.block_ids)))
        try:
            async with self._http().post(
                    url, data=body, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                status = r.status
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            log.warning("kv_transfer_failed", remote_request_id=remote.request_id,
                        peer=f"{remote.host}:{remote.port}", error=f"{type(e).__name__}: {e}")
            return PullOutcome.FAILED
        if status == 200:
            return PullOutcome.LOADED
        if status == 410:
            return PullOutcome.STALE
        log.warning("kv_transfer_failed", remote_request_id=remote.request_id,
                    peer=f"{remote.host}:{remote.port}", status=status)
        return PullOutcome.FAILED

    async def heartbeat(self, host: str, port: int, engine_id: str,
                        request_ids: list[str]) -> None:
        """Extend these leases on one prefill engine; a failure is only logged (as vLLM)."""
        body = self._encoder.encode(KVHeartbeat(engine_id, request_ids))
        try:
            async with self._http().post(
                    _base(host, port) + HEARTBEAT_PATH, data=body,
                    headers={"Content-Type": "application/json"}) as r:
                await r.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            log.warning("kv_heartbeat_failed", peer=f"{host}:{port}",
                        error=f"{type(e).__name__}: {e}")

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None
