"""Bus messages: one msgspec Struct per payload of the subject table in docs/architecture.md.

Every payload is a MessagePack map (field names as keys). Every message carries ``v``, its schema
version; readers ignore fields they do not know, so a newer writer can add fields without breaking
older readers. A breaking change bumps ``v``.

Block hashes of an engine (``engine hash``) are unsigned 64-bit ints; our own block keys
(``libs/kvblock``) are unsigned 64-bit ints too, but a different namespace.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

SCHEMA_VERSION = 1

# The most candidates a `routed` RequestEvent lists the scores of (the best ones).
ROUTED_SCORES_MAX = 8

# Storage tiers a block can live in, best first.
TIER_GPU = "GPU"
TIER_CPU = "CPU"
TIER_SHARED = "SHARED_STORAGE"  # storage every engine of the pool can load from: the pool's
TIER_LOCAL_STORAGE = "LOCAL_STORAGE"  # storage local to one engine (a node's disk): the pod's
TIERS: tuple[str, ...] = (TIER_GPU, TIER_CPU, TIER_SHARED, TIER_LOCAL_STORAGE)


class Message(msgspec.Struct, kw_only=True, omit_defaults=False):
    """Base of every bus message."""

    v: int = SCHEMA_VERSION


# --------------------------------------------------------------------------- KV events


class KVEvent(msgspec.Struct, kw_only=True, tag_field="type", omit_defaults=True):
    """Base of one KV-cache event in the project's schema (tagged by ``type``)."""


class BlockStored(KVEvent, tag="BlockStored"):
    """Blocks now held by the pod, in chain order; ``token_ids`` covers all of them."""

    block_hashes: list[int]
    parent_hash: int | None = None
    token_ids: list[int] = []
    block_size: int = 0
    tier: str = TIER_GPU
    lora_name: str | None = None
    extra_keys: list[Any] | None = None


class BlockRemoved(KVEvent, tag="BlockRemoved"):
    """Blocks the pod no longer holds in ``tier``."""

    block_hashes: list[int]
    tier: str = TIER_GPU


class AllBlocksCleared(KVEvent, tag="AllBlocksCleared"):
    """The pod dropped every block (``tier`` None: all tiers)."""

    tier: str | None = None


AnyKVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(Message, kw_only=True):
    """``im.kv.<pool>.<pod>``: a batch of one pod's events.

    ``seq`` is the agent's own gapless sequence within ``epoch`` (a random id chosen when the
    agent starts). A consumer that sees a new epoch or a gap asks for a snapshot.
    """

    pod: str
    pool: str
    epoch: str
    seq: int
    ts: float
    events: list[AnyKVEvent]
    engine_seq: int | None = None
    model: str = ""  # the engine's served model name (block keys are seeded by it)


class SnapshotRequest(Message, kw_only=True):
    """``im.snapshot.<pod>``: ask an agent for its pod's whole block set."""

    pod: str
    max_blocks_per_part: int = 4096


class SnapshotBlock(msgspec.Struct, array_like=True):
    """One block in a snapshot: engine hash, parent hash, its tokens and tiers."""

    block_hash: int
    parent_hash: int | None
    token_ids: list[int]
    tiers: list[str]
    lora_name: str | None = None
    extra_keys: list[Any] | None = None  # as BlockStored.extra_keys gave them for this block


class Snapshot(Message, kw_only=True):
    """One part of a pod's block set as of ``seq``; parents always come before children.

    The agent answers a SnapshotRequest with ``parts`` messages to the reply subject; NATS caps
    the size of one message, so a large cache is sent in parts.
    """

    pod: str
    pool: str
    epoch: str
    seq: int
    block_size: int
    part: int
    parts: int
    blocks: list[SnapshotBlock]
    model: str = ""


# --------------------------------------------------------------------------- pod state


class LoraInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """LoRA adapters an engine is running or has waiting, from ``vllm:lora_requests_info``,
    and those it has loaded (its ``/v1/models``).

    ``loaded`` is residency: the adapters the engine holds now (loaded at start, by
    ``/v1/load_lora_adapter`` or on a request's demand); ``PodState.adapters`` can name more,
    the adapters it would load on demand from its LoRA directory.
    """

    running: list[str] = []
    waiting: list[str] = []
    max_lora: int = 0
    loaded: list[str] = []


class PodState(Message, kw_only=True):
    """``im.pod.<pool>.<pod>``: heartbeat and load of one engine, at least every 250 ms.

    ``kv_seq`` is the last KV batch seq the agent published in ``epoch``: a consumer that saw
    fewer batches knows it missed some even when no new batch follows.
    """

    pod: str
    pool: str
    model: str
    url: str
    ts: float
    epoch: str
    kv_seq: int
    ready: bool = True
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    block_size: int = 0
    num_gpu_blocks: int = 0
    num_cpu_blocks: int = 0
    lora: LoraInfo = msgspec.field(default_factory=LoraInfo)
    role: Literal["both", "prefill", "decode"] = "both"
    labels: dict[str, str] = {}
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    max_model_len: int = 0
    # LoRA adapters the engine serves (model names besides `model`): loaded ones (lora.loaded)
    # and those it loads on demand from its LoRA directory
    adapters: list[str] = []


# --------------------------------------------------------------------------- request path


class TokenizeRequest(Message, kw_only=True):
    """``im.tokenize``: a prompt or chat messages → token count and block keys."""

    model: str
    block_size: int
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None  # None: the endpoint's default (True / False for chat)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None
    lora_name: str | None = None
    cache_salt: str | None = None
    return_token_ids: bool = False


class TokenizeReply(Message, kw_only=True):
    """Prompt length and one block key per full block.

    ``partial``: the prompt's end was never seen by the tokenizer (so no engine can hold its
    blocks), and the reply went out before tokenizing it: ``block_keys`` cover only the first
    ``known_tokens`` tokens (exact), and ``num_tokens`` is an estimate. The true count is more
    than ``known_tokens`` and at most ``max_num_tokens``. Never partial when ``token_ids`` were
    asked for.
    """

    num_tokens: int
    block_keys: list[int]
    token_ids: list[int] | None = None
    partial: bool = False
    known_tokens: int | None = None  # set when partial: tokens counted exactly
    max_num_tokens: int | None = None  # set when partial: an upper bound of the token count


class PodMatch(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One pod's longest run of matched blocks from the prompt start, with each block's tier.

    ``tiers`` has one entry per matched block (its best tier), or is empty when every matched
    block is on GPU — the common case, kept small on the wire.
    """

    pod: str
    blocks: int
    tiers: list[str] = []


class LookupRequest(Message, kw_only=True):
    """``im.index.lookup``: which pods hold how much of this prompt's prefix."""

    model: str
    block_keys: list[int]
    pods: list[str] | None = None


class LookupReply(Message, kw_only=True):
    """Matches for every pod with at least one block (or every pod asked about)."""

    matches: list[PodMatch]


class ScheduleRequest(Message, kw_only=True):
    """``im.schedule``: pick a pod for one request."""

    request_id: str
    model: str
    num_tokens: int
    block_keys: list[int] = []
    pool: str = "default"
    lora_name: str | None = None
    session_id: str | None = None
    profile: str | None = None
    exclude: list[str] = []
    labels: dict[str, str] = {}
    tokens_partial: bool = False  # num_tokens is the tokenizer's estimate (TokenizeReply.partial)
    # Publish the `routed` request event (with the keys) for the caller, which does not hold
    # the keys (a RouteRequest's ingress): it then does not publish that event itself.
    announce: bool = False


class ScheduleDecision(Message, kw_only=True):
    """The chosen pod, and each plugin's score per pod, for debugging.

    ``num_tokens`` and ``tokens_partial`` echo the request's, for a caller that sent a
    RouteRequest and never saw the tokenizer's reply.
    """

    request_id: str
    pod: str
    url: str
    profile: str
    scores: dict[str, dict[str, float]] = {}
    cached_blocks: int = 0
    num_tokens: int | None = None
    tokens_partial: bool = False
    # Prefill/decode disaggregation (docs/disaggregation.md): when the profile handler's decider
    # chose to disaggregate, the pod that prefills (``pod`` then decodes, with the KV it pulls
    # from this one), its URL and the profile that chose it; empty: ``pod`` serves it whole.
    prefill_pod: str = ""
    prefill_url: str = ""
    prefill_profile: str = ""


class RouteRequest(Message, kw_only=True):
    """``im.route``: tokenize, then schedule, in one bus trip for the caller.

    The tokenizer that takes it fills ``schedule``'s ``num_tokens`` and ``block_keys`` (and
    ``tokens_partial``) from ``tokenize`` and publishes it on ``im.schedule`` with the caller's
    reply subject; the answer is the scheduler's ScheduleDecision (or either service's error).
    """

    tokenize: TokenizeRequest
    schedule: ScheduleRequest


class RequestEvent(Message, kw_only=True):
    """``im.req.<pool>``: one step of a request's life, shared by every scheduler replica."""

    kind: Literal["routed", "first_token", "finished"]
    request_id: str
    pod: str
    pool: str
    model: str
    ts: float
    replica: str = ""
    num_tokens: int = 0
    block_keys: list[int] = []
    ttft_s: float | None = None
    output_tokens: int = 0
    cached_tokens: int = 0
    status: str = "ok"
    # Seconds the ingress's activator held the request for a ready engine before routing it
    # (part of ttft_s; more replicas would not have shortened it).
    held_s: float = 0.0
    # `routed` only, for people watching (the fleet console, `events tail`): the profile that
    # decided (empty: routed by load, the scheduler away), the total score of the best
    # candidates (pod → weighted sum, at most ROUTED_SCORES_MAX of them) and the blocks of the
    # prompt the chosen pod already held.
    profile: str = ""
    scores: dict[str, float] = {}
    cached_blocks: int = 0
    # Which part of a disaggregated request (docs/disaggregation.md): "prefill" (its own
    # request id, ``<id>-prefill``, so in-flight counts stay per pod) or "decode"; empty: the
    # whole request on one engine.
    leg: str = ""
    # `routed` only: the conversation the request belongs to (ScheduleRequest.session_id), so
    # every replica's session-affinity scorer learns where it went.
    session: str = ""


class ScaleDemand(Message, kw_only=True):
    """``im.scale.<pool>`` from the ingress: what it sees of demand."""

    kind: Literal["demand"] = "demand"
    pool: str
    model: str
    ts: float
    queued: int = 0  # requests held for the pool (no ready pod)
    in_flight: int = 0
    rate_rps: float = 0.0
    replica: str = ""  # the ingress replica (each one's latest demand counts)


class ScaleDecision(Message, kw_only=True):
    """``im.scale.<pool>`` from the autoscaler: the replica count it wants, every tick.

    ``inputs`` are what the analyzers saw (``spare_kv``, ``spare_queue``, ``needed``,
    ``ttft_p90_s``, …; docs/autoscaler.md), ``recommended`` the count before the cooldowns and
    stabilization, ``ready_replicas`` the ready pods it counted.
    """

    kind: Literal["decision"] = "decision"
    pool: str
    model: str
    ts: float
    target_replicas: int
    reason: str = ""
    ready_replicas: int = 0
    recommended: int = 0
    mode: str = ""
    replica: str = ""  # the autoscaler replica that decided
    inputs: dict[str, float] = {}


# Every message type that travels on the bus alone, by name (for schemas and `events tail`).
MESSAGE_TYPES: dict[str, type[msgspec.Struct]] = {
    cls.__name__: cls
    for cls in (
        KVEventBatch,
        SnapshotRequest,
        Snapshot,
        PodState,
        TokenizeRequest,
        TokenizeReply,
        LookupRequest,
        LookupReply,
        ScheduleRequest,
        ScheduleDecision,
        RequestEvent,
        ScaleDemand,
        ScaleDecision,
    )
}
