"""Session-affinity scorer: keeps a conversation on the engine that served its last turn."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from infermesh.proto.messages import RequestEvent, ScheduleRequest

from ..framework import CycleState, Handle, Parameters, Pod, RequestObserver, Scorer


class SessionAffinityScorer(Scorer, RequestObserver):
    """For a request with a session (``ScheduleRequest.session_id``: the ingress takes it from
    the ``x-session-id`` header or the ``infermesh-session`` cookie), 1 for the pod that the
    session's last request was routed to and 0 for the others; a request without a session, or
    whose session's pod is not a candidate (gone, excluded, filtered out), scores 1 everywhere
    (no preference), so the other scorers decide.

    The pod of each session comes from ``routed`` request events, which carry the session:
    every scheduler replica (and every ingress deciding here) follows the same events, so they
    all send a conversation's next turn to the same engine. A session not routed for ``ttl_s``
    is forgotten, and at most ``max_sessions`` are kept (the least recently routed go first).

    Why a scorer and not a filter: a session's engine can be saturated or its cache may have
    lost the conversation; with a weight against the prefix and load scorers, affinity wins
    ties and close calls, not every call. Parameters: ``ttl_s`` (600), ``max_sessions``
    (100,000).
    """

    type_name = "session-affinity-scorer"

    def __init__(self, name: str, *, ttl_s: float = 600.0, max_sessions: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name)
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.clock = clock
        # session → (pod, forget after), least recently routed first.
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> SessionAffinityScorer:
        """Factory for the registry."""
        ttl = params.number("ttl_s", 600.0, min=0.001)
        most = params.integer("max_sessions", 100_000, min=1)
        params.done()
        return cls(name, ttl_s=ttl, max_sessions=most)

    def __len__(self) -> int:
        return len(self._sessions)

    def pod_of(self, session: str) -> str | None:
        """The pod the session's last request went to, while remembered."""
        entry = self._sessions.get(session)
        if entry is None:
            return None
        if entry[1] <= self.clock():
            del self._sessions[session]
            return None
        return entry[0]

    def on_request_event(self, event: RequestEvent) -> None:
        """Remember where a session's request was routed (a prefill leg is not the session's
        engine: the decode leg is)."""
        if event.kind != "routed" or not event.session or not event.pod or event.leg == "prefill":
            return
        sessions = self._sessions
        sessions.pop(event.session, None)
        sessions[event.session] = (event.pod, self.clock() + self.ttl_s)
        now = self.clock()
        while sessions and (len(sessions) > self.max_sessions
                            or next(iter(sessions.values()))[1] <= now):
            sessions.popitem(last=False)

    async def score(
        self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]
    ) -> dict[str, float]:
        """1 for the session's pod, 0 for the others; 1 everywhere without one."""
        pod = self.pod_of(request.session_id) if request.session_id else None
        if pod is None or not any(p.name == pod for p in pods):
            return dict.fromkeys((p.name for p in pods), 1.0)
        return {p.name: 1.0 if p.name == pod else 0.0 for p in pods}
