"""vLLM 0.32's prefill/decode (NIXL connector, pull mode) protocol as the simulator speaks it.

A router sends the *prefill* engine the request with ``max_tokens: 1`` and
``kv_transfer_params: {"do_remote_decode": true, ...}``. That engine computes the prompt,
holds the request's blocks for a lease, and answers (non-streamed) with a top-level
``kv_transfer_params`` naming them (:func:`producer_params`). The router passes that dict
verbatim to the *decode* engine with the original request; the decode engine reads the
blocks from the prefill engine (:class:`RemotePrefill`), recomputes the last prompt token
and generates. References: ``vllm/distributed/kv_transfer/kv_connector/v1/nixl/``
(``pull_scheduler.py``: ``get_num_new_matched_tokens``, ``update_state_after_alloc``,
``request_finished``) and ``vllm/v1/core/sched/scheduler.py`` (``remote_prefill_cached_tokens``).

Real vLLM moves the blocks with NIXL over RDMA and meets on a ZMQ side channel; the
simulator's engines meet over HTTP instead, on the prefill engine's own port
(``remote_host``/``remote_port``): ``POST /sim/kv_transfer/{remote_request_id}`` reads and
releases the blocks, ``POST /sim/kv_heartbeat`` extends leases. The bodies are the structs
below. Only this module knows the dict's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

__all__ = [
    "PULL_PATH",
    "HEARTBEAT_PATH",
    "REQUIRED_REMOTE_KEYS",
    "IncompleteKVParams",
    "KVHeartbeat",
    "KVPull",
    "KVPulled",
    "RemotePrefill",
    "producer_params",
    "remote_prefill",
    "wants_remote_decode",
]

#: What the decode engine needs besides non-empty ``remote_block_ids`` (vLLM checks presence).
REQUIRED_REMOTE_KEYS = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port")
#: The prefill engine's sim-private routes (aiohttp patterns).
PULL_PATH = "/sim/kv_transfer/{remote_request_id}"
HEARTBEAT_PATH = "/sim/kv_heartbeat"


class IncompleteKVParams(ValueError):
    """``do_remote_prefill`` without the keys naming the blocks: vLLM logs "Got invalid
    KVTransferParams" and the request is computed locally."""


class KVPull(msgspec.Struct, forbid_unknown_fields=False):
    """Body of ``POST /sim/kv_transfer/{id}``: which engine and blocks the reader expects."""

    engine_id: str
    block_ids: list[int]


class KVPulled(msgspec.Struct):
    """Answer of a pull: the blocks were read and are released on the prefill engine."""

    request_id: str
    num_tokens: int
    num_blocks: int


class KVHeartbeat(msgspec.Struct, forbid_unknown_fields=False):
    """Body of ``POST /sim/kv_heartbeat``: extend these requests' leases (vLLM's ``HB:``
    notification, one per remote engine)."""

    engine_id: str
    request_ids: list[str]


def wants_remote_decode(params: dict[str, Any] | None) -> bool:
    """A request for the prefill engine: its blocks are kept for a remote decode."""
    return bool(params) and bool(params.get("do_remote_decode"))  # type: ignore[union-attr]


@dataclass(frozen=True, slots=True)
class RemotePrefill:
    """Where a decode request's prompt KV lives, read from its ``kv_transfer_params``.

    ``problem`` is set when the keys are there but their values cannot name a reachable
    engine or blocks: real vLLM's handshake or read then fails, so the request fails.
    """

    engine_id: str
    request_id: str
    host: str
    port: int
    block_ids: tuple[int, ...]
    cached_tokens: int | None = None  # the prefill engine's own prefix-cache hits
    problem: str | None = None

    @property
    def peer(self) -> tuple[str, int, str]:
        """The prefill engine, as heartbeats are grouped (vLLM: per remote engine id)."""
        return self.host, self.port, self.engine_id


def _int(value: Any) -> bool:
    return type(value) is int


def remote_prefill(params: dict[str, Any] | None) -> RemotePrefill | None:
    """The remote prefill a decode request names; None when it names none.

    Raises :class:`IncompleteKVParams` when ``do_remote_prefill`` is set but
    ``remote_block_ids`` is empty or a required key is absent (vLLM's connector checks
    ``key in params``). Values of the wrong type give a :class:`RemotePrefill` with a
    ``problem``: the transfer will fail, as vLLM's does.
    """
    if not params or not params.get("do_remote_prefill"):
        return None
    blocks = params.get("remote_block_ids")
    missing = [k for k in REQUIRED_REMOTE_KEYS if k not in params]
    if not blocks or missing:
        raise IncompleteKVParams(
            f"missing {', '.join(missing)}" if missing else "empty remote_block_ids")
    engine_id = params["remote_engine_id"]
    request_id = params["remote_request_id"]
    host = params["remote_host"]
    port = params["remote_port"]
    cached = params.get("remote_prefill_cached_tokens")
    cached_tokens = cached if type(cached) is int and cached >= 0 else None
    problem = None
    flat: list[int] = []
    if not isinstance(blocks, list) or not all(
            isinstance(g, list) and all(_int(b) and b >= 0 for b in g) for g in blocks):
        problem = "remote_block_ids is not a list of lists of block ids"
    elif len(blocks) != 1:
        problem = f"{len(blocks)} KV-cache groups; this engine has one"
    else:
        flat = blocks[0]
    if not isinstance(engine_id, str) or not isinstance(request_id, str):
        problem = "remote_engine_id and remote_request_id must be strings"
    elif not isinstance(host, str) or not host:
        problem = "remote_host must be a host name"
    elif type(port) is not int or not 0 < port < 65536:
        problem = "remote_port must be a port number"
    if problem is not None:
        return RemotePrefill(str(engine_id), str(request_id), str(host), 0, (),
                             cached_tokens, problem)
    return RemotePrefill(engine_id, request_id, host, port, tuple(flat), cached_tokens)


def producer_params(*, engine_id: str, request_id: str, host: str, port: int,
                    block_ids: list[int], num_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """The prefill engine's ``kv_transfer_params`` answer, keys in vLLM's order
    (``request_finished`` of the pull scheduler, then the scheduler's
    ``remote_prefill_cached_tokens``)."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [list(block_ids)],
        "remote_engine_id": engine_id,
        "remote_request_id": request_id,
        "remote_host": host,
        "remote_port": port,
        "tp_size": 1,
        "dcp_size": 1,
        "pp_size": 1,
        "remote_num_tokens": num_tokens,
        "remote_blocks_expiry_time": None,
        "transfer_mode": "pull",
        "remote_prefill_cached_tokens": cached_tokens,
    }
