"""Subject names on the bus. Every subject starts with a configurable prefix (default ``im``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "im"

# Queue groups: replicas of one service share the requests of a subject.
QUEUE_TOKENIZER = "tokenizer"
QUEUE_SCHEDULER = "scheduler"
QUEUE_INDEXER = "indexer"

_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_token(value: str, what: str = "name") -> str:
    """Return ``value`` if it is usable as one NATS subject token, else raise ``ValueError``.

    Pool and pod names become subject tokens, so dots, wildcards and spaces would change the
    meaning of a subject; we refuse them at the edge rather than escape them.
    """
    if not _TOKEN.match(value):
        raise ValueError(
            f"{what} {value!r} is not a valid subject token: use letters, digits, '_' or '-'"
        )
    return value


@dataclass(frozen=True, slots=True)
class Subjects:
    """Every subject of the bus (docs/architecture.md) under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        for part in self.prefix.split("."):
            check_token(part, "subject prefix")

    @property
    def tokenize(self) -> str:
        """Request/reply: TokenizeRequest → TokenizeReply (queue group ``tokenizer``)."""
        return f"{self.prefix}.tokenize"

    @property
    def route(self) -> str:
        """Request/reply: RouteRequest → ScheduleDecision. A tokenizer replica takes it (queue
        group ``tokenizer``), tokenizes, and forwards the ScheduleRequest to ``schedule`` with
        the caller's reply subject: the scheduler's decision comes straight back."""
        return f"{self.prefix}.route"

    @property
    def schedule(self) -> str:
        """Request/reply: ScheduleRequest → ScheduleDecision (queue group ``scheduler``)."""
        return f"{self.prefix}.schedule"

    @property
    def index_lookup(self) -> str:
        """Request/reply: LookupRequest → LookupReply (queue group ``indexer``)."""
        return f"{self.prefix}.index.lookup"

    def kv(self, pool: str, pod: str) -> str:
        """Publish: one pod's KVEventBatch stream."""
        return f"{self.prefix}.kv.{check_token(pool, 'pool')}.{check_token(pod, 'pod')}"

    @property
    def kv_all(self) -> str:
        """Wildcard for every pod's KV stream (what every indexer subscribes to)."""
        return f"{self.prefix}.kv.*.*"

    def kv_snapshot(self, pod: str) -> str:
        """Request/reply to one pod's agent: SnapshotRequest → Snapshot chunks.

        Outside ``im.kv.``, so a KV-stream subscriber never receives snapshot requests, and a
        request for a pod whose agent is gone fails at once with no responders.
        """
        return f"{self.prefix}.snapshot.{check_token(pod, 'pod')}"

    @property
    def kv_snapshot_all(self) -> str:
        """Wildcard for every pod's snapshot subject (who may ask for snapshots)."""
        return f"{self.prefix}.snapshot.*"

    def pod_state(self, pool: str, pod: str) -> str:
        """Publish every ≤250 ms: PodState heartbeat."""
        return f"{self.prefix}.pod.{check_token(pool, 'pool')}.{check_token(pod, 'pod')}"

    @property
    def pod_state_all(self) -> str:
        """Wildcard for every pod's heartbeat."""
        return f"{self.prefix}.pod.*.*"

    def req(self, pool: str) -> str:
        """Publish: RequestEvent (routed / first token / finished)."""
        return f"{self.prefix}.req.{check_token(pool, 'pool')}"

    @property
    def req_all(self) -> str:
        """Wildcard for request events of every pool."""
        return f"{self.prefix}.req.*"

    def scale(self, pool: str) -> str:
        """Publish: ScaleDemand (ingress) and ScaleDecision (autoscaler)."""
        return f"{self.prefix}.scale.{check_token(pool, 'pool')}"

    @property
    def scale_all(self) -> str:
        """Subscribe: every pool's demand and decisions."""
        return f"{self.prefix}.scale.*"

    @property
    def autoscaler_lease_bucket(self) -> str:
        """The JetStream key-value bucket of the autoscalers' leader lease (key ``leader``):
        ``<prefix>_autoscaler``, dots of the prefix as ``_`` (bucket names take no dots)."""
        return f"{self.prefix.replace('.', '_')}_autoscaler"

    def autoscaler_lease_subjects(self) -> tuple[str, ...]:
        """What a lease holder publishes to: the bucket's JetStream API (info, create, direct
        and plain reads) and its keys."""
        stream = f"KV_{self.autoscaler_lease_bucket}"
        return (f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.CREATE.{stream}",
                f"$JS.API.STREAM.MSG.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>",
                f"$KV.{self.autoscaler_lease_bucket}.>")

    def parse_kv(self, subject: str) -> tuple[str, str] | None:
        """Return ``(pool, pod)`` for a KV event subject, ``None`` for any other subject."""
        head = f"{self.prefix}.kv."
        if not subject.startswith(head):
            return None
        rest = subject[len(head) :].split(".")
        if len(rest) != 2:
            return None
        return rest[0], rest[1]

    def parse_pod_state(self, subject: str) -> tuple[str, str] | None:
        """Return ``(pool, pod)`` for a heartbeat subject, ``None`` otherwise."""
        head = f"{self.prefix}.pod."
        if not subject.startswith(head):
            return None
        rest = subject[len(head) :].split(".")
        if len(rest) != 2:
            return None
        return rest[0], rest[1]
